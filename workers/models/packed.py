"""`fp16w`: fp16 weights, fp32 activations, through fbgemm's packed half-precision GEMM (x86 CPUs).

On a CPU without native bf16 (no AVX512-BF16 or AMX: AVX2-only parts such as many AMD EPYC and laptop chips),
`bf16` is emulated and far slower than `fp32`, and `fp32` matrix products at the handful of rows a decode or a
verify step has run well below the machine's peak: MKL's small-M GEMM packs the large operand on every call. fbgemm
(already inside the torch CPU wheel, behind dynamic quantization) keeps each weight matrix packed once, in fp16, in
the layout its small-M kernels read, and converts to fp32 in registers. Half the bytes per weight, no per-call
packing. Measured on one AVX2 EPYC core, the 211 weight matrices of SmolLM2-135M (30 layers x 7 + the LM head):

    rows M        1      4      8
    fp32 F.linear 64 ms  94 ms  116 ms
    fp16w         26 ms  32 ms   51 ms

so a target forward gets ~2x faster and a verify of 4-8 positions gets cheaper relative to a single-token step.

Numerics: every product is fp32 math over fp16-rounded weights (10 mantissa bits, more than bf16's 7), so `fp16w`
is a slightly different model from `fp32`, and speculative decoding is exact with respect to it: greedy output with
any drafter equals the `fp16w` target's own greedy output. Norms, embeddings, attention and the KV cache stay fp32.

`pack_fp16_weights(model)` is a transformation of a loaded plain `Decoder` (like tensor parallelism, and applied
after it): it swaps every linear layer for a `PackedLinear` and adds a packed copy of the LM head for `logits`
(the fp32 LM head itself stays, for embeddings and learned drafters). Inference only: the packed op has no backward.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch import nn

FP16W = "fp16w"


@contextlib.contextmanager
def _quiet_stderr():
    """fbgemm's fp16 ops print a one-time C++ deprecation notice straight to fd 2 (not a Python warning, so
    `warnings` cannot filter it); the first call of each happens here, with fd 2 pointed at /dev/null."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@functools.cache
def fp16w_supported() -> bool:
    """Whether this torch build has fbgemm's packed fp16 GEMM (x86-64 CPU wheels do; ARM wheels do not)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        with _quiet_stderr():
            w = torch.ones(4, 8)
            packed = torch.ops.aten.fbgemm_pack_gemm_matrix_fp16(w)
            y = torch.ops.aten.fbgemm_linear_fp16_weight(torch.ones(2, 8), packed, torch.zeros(4))
        return bool(torch.allclose(y, torch.full((2, 4), 8.0)))
    except (RuntimeError, AttributeError):
        return False


def require_fp16w(device: str | torch.device = "cpu") -> None:
    if torch.device(device).type != "cpu":
        raise ValueError("fp16w is a CPU weight format (fbgemm); on a GPU use bf16 or fp16")
    if not fp16w_supported():
        raise ValueError("fp16w needs fbgemm, which this torch build lacks (x86-64 CPU wheels have it); use fp32")


class PackedLinear(nn.Module):
    """y = x W^T + b with W held only as fbgemm's packed fp16 matrix; x and y are fp32, any leading shape."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        require_fp16w(weight.device)
        self.out_features, self.in_features = weight.shape
        with torch.no_grad():
            self.packed = torch.ops.aten.fbgemm_pack_gemm_matrix_fp16(weight.detach().float().contiguous())
            b = torch.zeros(self.out_features) if bias is None else bias.detach().float().clone()
        self.register_buffer("bias", b, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.fbgemm_linear_fp16_weight(x.float(), self.packed, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=fp16 (fbgemm packed)"


def _swap_linears(module: nn.Module) -> int:
    n = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child.weight, child.bias))
            n += 1
        else:
            n += _swap_linears(child)
    return n


@torch.no_grad()
def pack_fp16_weights(model) -> int:
    """Pack a loaded `Decoder` for fp16w in place (after `apply_tensor_parallel`, if any); returns the number of
    matrices packed. Row-parallel layers keep their all-reduce: only their local product is swapped."""
    from workers.models.tp import RowParallelLinear

    if model.packed_lm_head is not None:
        raise ValueError("the model's weights are already packed")
    if model.dtype != torch.float32:
        raise ValueError(f"fp16w packs an fp32 model, not {model.dtype}")
    n = 0
    for block in model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, RowParallelLinear):
                    child.local = PackedLinear(child.weight, None)
                    del child.weight
                    n += 1
        n += _swap_linears(block)
    model.packed_lm_head = PackedLinear(model.lm_head_weight())
    return n + 1
