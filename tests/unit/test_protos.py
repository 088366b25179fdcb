"""The committed gRPC stubs are exactly what protoc generates from protos/specray.proto."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_match_proto(tmp_path):
    (tmp_path / "protos").mkdir()
    shutil.copy(ROOT / "protos" / "specray.proto", tmp_path / "protos" / "specray.proto")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.",
                    "--grpc_python_out=.", "protos/specray.proto"], cwd=tmp_path, check=True)
    for name in ("specray_pb2.py", "specray_pb2.pyi", "specray_pb2_grpc.py"):
        fresh = (tmp_path / "protos" / name).read_text()
        committed = (ROOT / "protos" / name).read_text()
        assert fresh == committed, f"protos/{name} is stale: regenerate it (see protos/__init__.py)"


def test_tensor_roundtrip():
    import torch

    from protos import specray_pb2 as pb
    from workers.wire import tensor_from_proto, tensor_to_proto

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64):
        t = (torch.randn(3, 5) * 10).to(dtype)
        msg = pb.Tensor.FromString(tensor_to_proto(t).SerializeToString())
        back = tensor_from_proto(msg)
        assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)
