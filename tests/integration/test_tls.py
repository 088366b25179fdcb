"""Mutual TLS on both gRPC hops (router -> target, target -> draft), on loopback with the real servers and clients:
greedy output through TLS equals target-only output and tau == k + 1 with draft == target (the draft hop really
carried drafts); a client without a certificate, with one from another CA, or speaking plaintext is refused;
bad TLS settings are clear errors before anything starts."""

from __future__ import annotations

import asyncio
import json
import stat
import time

import grpc
import pytest

from cluster.cli import main as cli_main
from cluster.config import SpecrayConfig, TLSConfig
from cluster.tls import write_certs
from protos import specray_pb2 as pb
from protos import specray_pb2_grpc as pb_grpc
from router.target_pool import TargetPoolClient
from workers.drafters.model import ModelDrafter
from workers.engine.async_engine import AsyncEngine
from workers.engine.engine import SpecEngine
from workers.engine.multi_draft import MultiDraftClient
from workers.engine.sequence import Request
from workers.models.loader import load_model
from workers.servers.draft_server import serve_draft
from workers.servers.target_server import TargetServer, TargetWorker
from workers.wire import GrpcTLS, open_channel

K = 3
PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    ours = write_certs(root / "ours")
    theirs = write_certs(root / "theirs")  # a different CA: its certificates must not be accepted
    return {"dir": root / "ours", "ours": GrpcTLS.from_files(**ours), "theirs": GrpcTLS.from_files(**theirs)}


@pytest.fixture(scope="module")
def target(tiny_llama):
    return load_model(str(tiny_llama))


def _info(address: str, tls: GrpcTLS | None, stub_cls=pb_grpc.DraftServiceStub):
    with open_channel(address, tls) as ch:
        return stub_cls(ch).Info(pb.InfoRequest(), timeout=3.0)


def test_both_hops_over_mutual_tls_are_exact_and_carry_drafts(certs, target, tiny_llama):
    tls = certs["ours"]
    ids = target.tokenizer.encode(PROMPT)
    max_tokens = 1 + (K + 1) * 6
    ref = SpecEngine(target, None, max_batch=1).run([Request("ref", ids, max_tokens, num_draft_tokens=0,
                                                             ignore_eos=True)])[0].output_ids

    dserver, dworker, dport = serve_draft(ModelDrafter(load_model(str(tiny_llama))), "model:self", tls=tls)
    draft_addr = f"127.0.0.1:{dport}"
    drafts = MultiDraftClient(k=K, max_wait_s=2.0, tls=tls)
    engine = AsyncEngine(SpecEngine(target, drafts, max_batch=2))
    tserver = TargetServer(TargetWorker(engine, drafts, "tiny"), tls=tls)
    target_addr = f"127.0.0.1:{tserver.port}"
    pool = TargetPoolClient(lambda: [target_addr], lambda: [draft_addr], refresh_s=0.05, tls=tls)

    async def generate(seq_id: str):
        out, stats = [], None
        async for d in pool.generate(Request(seq_id, ids, max_tokens, num_draft_tokens=K, ignore_eos=True)):
            out += d.token_ids
            stats = d.stats or stats
        return out, stats

    async def run():
        try:
            drafts.ensure(draft_addr)  # the target's stream to the draft replica is up before we measure tau
            deadline = time.monotonic() + 10
            while draft_addr not in drafts.clients and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return [await generate(f"r{i}") for i in range(2)]
        finally:
            await pool.close()

    try:
        results = asyncio.run(run())
        for out, stats in results:
            assert out == ref
        out, stats = results[1]
        assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
        assert len(out) / stats.num_steps > K  # tau == k + 1 but for a final partial step
        deadline = time.monotonic() + 5
        while dworker.seqs and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not dworker.seqs  # finished sequences freed on the draft worker, through TLS too
    finally:
        tserver.stop()
        engine.shutdown()
        drafts.close()
        dworker.stop()
        dserver.stop(0)


def test_the_servers_refuse_clients_without_our_certificates(certs, target):
    ours, theirs = certs["ours"], certs["theirs"]
    dserver, dworker, dport = serve_draft(ModelDrafter(target), "model:self", tls=ours)
    tserver = TargetServer(TargetWorker(AsyncEngine(SpecEngine(target, None, max_batch=1)), None, "tiny"), tls=ours)
    plain, plain_worker, plain_port = serve_draft(ModelDrafter(target), "model:self")
    try:
        for addr, stub in ((f"127.0.0.1:{dport}", pb_grpc.DraftServiceStub),
                           (f"127.0.0.1:{tserver.port}", pb_grpc.TargetServiceStub)):
            assert _info(addr, ours, stub) is not None  # positive control: our CA, our certificate
            for bad in (None, theirs):  # plaintext; a certificate from another CA
                with pytest.raises(grpc.RpcError) as e:
                    _info(addr, bad, stub)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # a client holding only the CA (no client certificate) is refused too: the servers require one
        ca_only = grpc.ssl_channel_credentials(root_certificates=ours.ca)
        with grpc.secure_channel(f"127.0.0.1:{dport}", ca_only,
                                 options=[("grpc.ssl_target_name_override", ours.server_name)]) as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.DraftServiceStub(ch).Info(pb.InfoRequest(), timeout=3.0)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # and a TLS client never talks to a plaintext server
        with pytest.raises(grpc.RpcError):
            _info(f"127.0.0.1:{plain_port}", ours)
        assert _info(f"127.0.0.1:{plain_port}", None).drafter == "model:self"
    finally:
        tserver.stop()
        tserver.worker.engine.shutdown()
        for s, w in ((dserver, dworker), (plain, plain_worker)):
            w.stop()
            s.stop(0)


def test_tls_certs_command_and_config(tmp_path, capsys):
    out = tmp_path / "certs"
    assert cli_main(["tls-certs", "--out", str(out), "--server-name", "spec.internal", "--days", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)["tls"]
    assert printed["server_name"] == "spec.internal"
    for f in ("ca-key.pem", "node-key.pem"):
        assert stat.S_IMODE((out / f).stat().st_mode) == 0o600
    cfg = SpecrayConfig.model_validate({"tls": printed})
    tls = cfg.tls.load()
    assert tls.server_name == "spec.internal" and b"BEGIN CERTIFICATE" in tls.cert
    assert SpecrayConfig.model_validate(cfg.model_dump()).tls == cfg.tls  # survives the trip into replicas


def test_bad_tls_settings_are_clear_errors(tmp_path, certs, capsys):
    files = {"ca_file": str(certs["dir"] / "ca.pem"), "cert_file": str(certs["dir"] / "node.pem"),
             "key_file": str(tmp_path / "missing-key.pem")}
    with pytest.raises(ValueError, match="tls.key_file: cannot read .*missing-key.pem"):
        TLSConfig(**files).load()
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="tls.ca_file: .*junk.pem is not a PEM file"):
        TLSConfig(**(files | {"ca_file": str(tmp_path / "junk.pem")})).load()
    with pytest.raises(ValueError, match="extra"):
        SpecrayConfig.model_validate({"tls": files | {"verify": False}})  # strict, like every section
    # the serve command fails fast, before Ray or any model starts
    assert cli_main(["serve", "--tls-dir", str(tmp_path / "nowhere")]) == 2
    assert "--tls-dir: cannot read" in capsys.readouterr().err
    assert cli_main(["serve", "--in-process", "--tls-dir", str(certs["dir"])]) == 2
    assert "--in-process has none" in capsys.readouterr().err
    # what gRPC would only report as "failed to bind" or a handshake that never completes
    other = certs["dir"].parent / "theirs"
    with pytest.raises(ValueError, match="the key does not match the certificate"):
        TLSConfig(**(files | {"key_file": str(other / "node-key.pem")})).load()
    with pytest.raises(ValueError, match="tls.server_name: 'elsewhere' is not among the certificate's DNS names"):
        TLSConfig(**(files | {"key_file": str(certs["dir"] / "node-key.pem"), "server_name": "elsewhere"})).load()
    with pytest.raises(ValueError, match="tls.ca_file: not a usable CA bundle"):
        bad_ca = tmp_path / "bad-ca.pem"
        bad_ca.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        TLSConfig(**(files | {"key_file": str(certs["dir"] / "node-key.pem"), "ca_file": str(bad_ca)})).load()
    assert b"PRIVATE KEY" not in repr(certs["ours"]).encode()  # the key never reaches a log line
    (tmp_path / "a-file").write_text("")
    assert cli_main(["tls-certs", "--out", str(tmp_path / "a-file")]) == 2
    assert "--out" in capsys.readouterr().err


def test_tls_dir_takes_the_server_name_from_the_certificate(tmp_path):
    from cluster.tls import tls_section

    write_certs(tmp_path, server_name="spec.internal")
    section = tls_section(tmp_path)
    assert section["server_name"] == "spec.internal"
    assert TLSConfig(**section).load().server_name == "spec.internal"


def test_an_expired_certificate_is_a_clear_error(tmp_path, certs):
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca_key = serialization.load_pem_private_key((certs["dir"] / "ca-key.pem").read_bytes(), None)
    node_key = serialization.load_pem_private_key((certs["dir"] / "node-key.pem").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((certs["dir"] / "ca.pem").read_bytes())
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)
    cert = (x509.CertificateBuilder().subject_name(ca.subject).issuer_name(ca.subject)
            .public_key(node_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(past).not_valid_after(past + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("specray")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (tmp_path / "old.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ValueError, match="tls.cert_file: the certificate expired on"):
        TLSConfig(ca_file=str(certs["dir"] / "ca.pem"), cert_file=str(tmp_path / "old.pem"),
                  key_file=str(certs["dir"] / "node-key.pem")).load()
