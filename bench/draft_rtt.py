"""The draft <-> target overhead of one step on loopback, without models in the way.

A draft worker with the model-free ngram drafter runs in its own process; the client here plays the target: each
step it sends a verdict that contradicts the draft (so the draft must roll back and draft anew, the worst case for
the pipeline) and waits for the next block. The time from `drafts()` being called to the block being there is the
per-step overhead a target pays when the draft is not ahead: two gRPC messages, thread hand-offs on both sides and
the (tiny) ngram proposal. Run it on a quiet machine; under CPU contention thread wake-ups dominate.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from workers.drafters.base import DraftRequest
from workers.engine.remote_draft import RemoteDraftClient
from workers.params import SamplingParams
from workers.wire import GrpcTLS, free_port

_SERVER = """
import json, sys, time
from workers.drafters.ngram import NgramDrafter
from workers.servers.draft_server import serve_draft
from workers.wire import GrpcTLS
tls = GrpcTLS.from_files(**json.loads(sys.argv[3])) if sys.argv[3] != "null" else None
server, worker, _ = serve_draft(NgramDrafter(), "ngram", port=int(sys.argv[1]), tls=tls)  # keep it referenced
time.sleep(float(sys.argv[2]))
"""


def run_draft_rtt(steps: int = 300, k: int = 4, warmup: int = 20, timeout_s: float = 120.0,
                  tls_files: dict | None = None) -> dict:
    """One draft worker process, `steps` measured round trips; over mutual TLS with `tls_files`
    (cluster.tls.tls_files)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(port), str(timeout_s), json.dumps(tls_files)])
    try:
        tls = GrpcTLS.from_files(**tls_files) if tls_files else None
        client = RemoteDraftClient(f"127.0.0.1:{port}", k=k, max_wait_s=1.0, connect_timeout_s=30, tls=tls)
        secure = tls is not None and _refuses_plaintext(f"127.0.0.1:{port}")
        ctx = list(range(50)) * 4  # repetitive, so the ngram drafter always has a continuation
        client.start("s", SamplingParams())
        client.verdict("s", ctx, 1, 0, None)
        lat = []
        for _ in range(steps + warmup):
            t = time.perf_counter()
            (prop,) = client.drafts([DraftRequest("s", ctx, k)])
            lat.append(time.perf_counter() - t)
            new = prop.tokens[:1] + [10**6]  # accept one token, then a token the draft did not guess: epoch bump
            ctx = ctx + new
            client.verdict("s", ctx, len(new), 0, None)
        alive = client.alive
        client.close()
        if not alive:
            raise RuntimeError("the draft stream broke during the measurement")
    finally:
        proc.kill()
        proc.wait()
    return {"steps": steps, "k": k, "round_trip_ms": _percentiles(lat[warmup:]), "samples_s": lat[warmup:],
            "mutual_tls": secure}


def _refuses_plaintext(address: str) -> bool:
    """The worker really runs TLS: a plaintext client gets nothing from it."""
    import grpc

    from protos import specray_pb2 as pb
    from protos import specray_pb2_grpc as pb_grpc

    try:
        with grpc.insecure_channel(address) as ch:
            pb_grpc.DraftServiceStub(ch).Info(pb.InfoRequest(), timeout=2.0)
    except grpc.RpcError:
        return True
    return False


def _percentiles(lat: list[float]) -> dict:
    s = sorted(lat)
    return {"p50": round(statistics.median(s) * 1e3, 3), "p90": round(s[int(0.9 * (len(s) - 1))] * 1e3, 3)}


def run_draft_rtt_bench(steps: int = 300, k: int = 4, compare_tls: bool = False, rounds: int = 3) -> dict:
    """The round trip, plain; with compare_tls also over mutual TLS, side by side: `rounds` alternating runs of
    steps / rounds each (a fresh worker process per run, throw-away certificates), so drift on a shared machine
    hits both alike. Reports the pooled p50 / p90 of each and their ratio."""
    if not compare_tls:
        r = run_draft_rtt(steps, k)
        r.pop("samples_s"), r.pop("mutual_tls")
        return r
    import tempfile

    from cluster.tls import write_certs

    per = max(1, steps // rounds)
    lat: dict[str, list[float]] = {"plain": [], "mtls": []}
    with tempfile.TemporaryDirectory() as d:
        files = write_certs(d)
        for _ in range(rounds):
            lat["plain"] += run_draft_rtt(per, k)["samples_s"]
            r = run_draft_rtt(per, k, tls_files=files)
            if not r["mutual_tls"]:
                raise RuntimeError("the TLS draft worker answered a plaintext client")
            lat["mtls"] += r["samples_s"]
    out = {"steps": per * rounds, "k": k, "rounds": rounds,
           "round_trip_ms": {name: _percentiles(v) for name, v in lat.items()}}
    rt = out["round_trip_ms"]
    out["mtls_vs_plain_p50"] = round(rt["mtls"]["p50"] / rt["plain"]["p50"], 3)
    return out
