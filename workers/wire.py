"""Conversions between torch / engine values and the protobuf messages of protos/specray.proto, and the channels
and ports of every specray gRPC hop (plain, or mutual TLS).

Tensors travel as raw little-endian bytes plus dtype and shape (bf16 as its 16-bit pattern), never pickled.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from protos import specray_pb2 as pb
from workers.params import SamplingParams

_TO_PB = {torch.float32: pb.FLOAT32, torch.bfloat16: pb.BFLOAT16, torch.float16: pb.FLOAT16,
          torch.int64: pb.INT64, torch.int32: pb.INT32}
_FROM_PB = {v: k for k, v in _TO_PB.items()}
MAX_TENSOR_BYTES = 256 << 20

_LIMITS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
# Both ends ping every 10 s so a dead peer is noticed within ~15 s; the server accepts pings that often.
CLIENT_OPTIONS = _LIMITS + [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS = _LIMITS + [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]


def tensor_to_proto(t: torch.Tensor) -> pb.Tensor:
    t = t.detach().contiguous().cpu()
    if t.dtype not in _TO_PB:
        raise ValueError(f"unsupported tensor dtype on the wire: {t.dtype}")
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # numpy has no bfloat16: ship the bit pattern
    return pb.Tensor(dtype=_TO_PB[t.dtype], shape=list(t.shape), data=raw.numpy().tobytes())


def tensor_from_proto(msg: pb.Tensor) -> torch.Tensor:
    if msg.dtype not in _FROM_PB:
        raise ValueError(f"unknown tensor dtype {msg.dtype}")
    dtype = _FROM_PB[msg.dtype]
    shape = list(msg.shape)
    numel = 1
    for s in shape:
        if s < 0:
            raise ValueError(f"negative dimension in tensor shape {shape}")
        numel *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    if numel * itemsize != len(msg.data) or len(msg.data) > MAX_TENSOR_BYTES:
        raise ValueError(f"tensor payload of {len(msg.data)} bytes does not match shape {shape} and {dtype}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    carrier = torch.int16 if dtype == torch.bfloat16 else dtype
    t = torch.frombuffer(bytearray(msg.data), dtype=carrier).view(shape)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def params_to_proto(p: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p)
    if p.seed is not None:
        msg.seed = p.seed % (1 << 64)
    return msg


def params_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(temperature=msg.temperature, top_k=msg.top_k, top_p=msg.top_p or 1.0,
                          seed=msg.seed if msg.HasField("seed") else None)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for a gRPC server or a torch.distributed rendezvous)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# --- transport security --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GrpcTLS:
    """Mutual TLS for every specray gRPC hop (router -> target, target -> draft): each server asks for a client
    certificate signed by `ca`, each client checks the server's against `ca` and presents its own. Workers dial one
    another by IP, so the certificates name the service instead (`server_name`, a DNS entry of their
    subjectAltName) and clients verify that name rather than the address they dial."""

    ca: bytes
    cert: bytes
    key: bytes = field(repr=False)  # never in a log line
    server_name: str = "specray"

    @classmethod
    def from_files(cls, ca_file: str | Path, cert_file: str | Path, key_file: str | Path,
                   server_name: str = "specray") -> "GrpcTLS":
        def read(p: Path, what: str, marker: bytes) -> bytes:
            try:
                data = p.read_bytes()
            except OSError as e:
                raise ValueError(f"tls.{what}: cannot read {p}: {e.strerror or e}") from None
            if marker not in data:
                raise ValueError(f"tls.{what}: {p} is not a PEM file ({marker.decode()} not found)")
            return data

        ca_file, cert_file, key_file = (Path(p).expanduser() for p in (ca_file, cert_file, key_file))
        tls = cls(ca=read(ca_file, "ca_file", b"-----BEGIN CERTIFICATE-----"),
                  cert=read(cert_file, "cert_file", b"-----BEGIN CERTIFICATE-----"),
                  key=read(key_file, "key_file", b"PRIVATE KEY-----"), server_name=server_name)
        _check_tls_files(ca_file, cert_file, key_file, tls)
        return tls

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)


def _check_tls_files(ca_file: Path, cert_file: Path, key_file: Path, tls: GrpcTLS) -> None:
    """What gRPC would only report as "failed to bind" or a handshake that never completes, as a ValueError naming
    the setting: a key that is not the certificate's (or is encrypted), an unreadable CA bundle, a certificate that
    has expired or does not carry server_name."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file), password=lambda: b"")
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"tls.cert_file / tls.key_file: the key does not match the certificate, or is encrypted "
                         f"(specray needs an unencrypted key): {e}") from None
    try:
        ctx.load_verify_locations(str(ca_file))
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"tls.ca_file: not a usable CA bundle: {e}") from None
    try:
        from cryptography import x509
    except ImportError:  # pragma: no cover - installed with ray's dependencies; the checks above still ran
        return
    import datetime as dt

    cert = x509.load_pem_x509_certificate(tls.cert)
    if cert.not_valid_after_utc < dt.datetime.now(dt.timezone.utc):
        raise ValueError(f"tls.cert_file: the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    names = certificate_dns_names(cert)
    if tls.server_name not in names:
        raise ValueError(f"tls.server_name: {tls.server_name!r} is not among the certificate's DNS names "
                         f"{names or '(none)'}; clients would refuse every handshake")


def certificate_dns_names(cert) -> list[str]:
    """The DNS names of a certificate's subjectAltName (a cryptography x509.Certificate, or PEM bytes)."""
    from cryptography import x509

    if isinstance(cert, bytes):
        cert = x509.load_pem_x509_certificate(cert)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.DNSName)


def add_port(server, address: str, tls: GrpcTLS | None) -> int:
    """Bind a (sync or aio) gRPC server to address, with mutual TLS when `tls` is given; returns the port. A failed
    bind is an OSError naming the address (grpcio raises a bare RuntimeError)."""
    try:
        port = server.add_secure_port(address, tls.server_credentials()) if tls else server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"cannot bind a gRPC server to {address}: {e}") from None
    if port == 0:
        raise OSError(f"cannot bind a gRPC server to {address}")
    return port


def open_channel(address: str, tls: GrpcTLS | None, aio: bool = False):
    """A client channel with CLIENT_OPTIONS, over mutual TLS when `tls` is given."""
    mod = grpc.aio if aio else grpc
    if tls is None:
        return mod.insecure_channel(address, options=CLIENT_OPTIONS)
    options = CLIENT_OPTIONS + [("grpc.ssl_target_name_override", tls.server_name)]
    return mod.secure_channel(address, tls.channel_credentials(), options=options)
