"""Conversions between torch / engine values and the protobuf messages of protos/specray.proto.

Tensors travel as raw little-endian bytes plus dtype and shape (bf16 as its 16-bit pattern), never pickled.
"""

from __future__ import annotations

import socket

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
