"""Tensor parallelism as a transformation of a plain `Decoder` (gpt-fast's `tp.py` pattern).

`apply_tensor_parallel(model, rank, world)` rewrites a loaded model in place so that rank `rank` of a group of
`world` processes holds only its shard of every attention and MLP layer. The model file knows nothing about ranks:
the only collective is an all-reduce hidden inside the row-parallel layers this module swaps in.

The split is Megatron-LM's (Shoeybi et al. 2019, arXiv:1909.08053, section 3): in each block the first linear layer
is split by output features (column-parallel) and the second by input features (row-parallel), so the activation
between them never leaves the rank and each block costs exactly one all-reduce (SUM) of its [B, T, d] output:

    attention:  q/k/v_proj  colwise by heads   ->  local attention over local heads  ->  o_proj rowwise  + all-reduce
    MLP:        gate/up     colwise            ->  act(gate) * up (elementwise)       ->  down_proj rowwise + all-reduce

Attention is split by KV-head groups: a rank owns a contiguous range of KV heads and, for grouped-query attention,
exactly the query heads that read them (HF layout: query head h reads KV head h // (n_heads / n_kv)), so attention
stays local. Qwen2's q/k/v biases are split with their rows; q_norm/k_norm act per head over head_dim and stay
replicated. A row-parallel layer's bias (none of the supported families has one) is added once, after the reduce.

Counts need not divide evenly: SmolLM2-135M has 9 query heads over 3 KV heads, and with world 2 the KV heads split
[1, 2] (query heads [3, 6]); the intermediate size splits the same way. Remainders go to the LAST ranks: rank 0 is
the group's leader and also runs the verifier, sampling and the host-side loop, so it gets the lighter shard.
A KV head is never split or replicated, so world may not exceed the number of KV heads (vLLM replicates KV heads
in that case; not needed for the models specray targets).

Embedding, final norm and LM head stay replicated: every rank holds the full [B, T, d] residual stream after each
all-reduce, so hidden states for learned drafters can be read on rank 0 unchanged. A vocab-parallel LM head
(Megatron's `VocabParallelEmbedding` / vLLM's `ParallelLMHead`: each rank scores a slice of the vocabulary, then a
gather on rank 0) would save V * d / world multiply-adds per position and can come later; followers would then
have to run the LM head in the leader's logits mode.

After the transformation `model.args` is a copy with the LOCAL head counts and intermediate size, so
`model.new_cache(...)` allocates a KV cache holding only this rank's KV heads and nothing else in the model file
changes. The full-size description and the rank's ranges are kept in `model.tp` (a `TPShard`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from workers.models.config import ModelArgs
from workers.models.decoder import Decoder


def split_sizes(n: int, world: int) -> list[int]:
    """Split n items over world ranks as evenly as possible, remainders on the last ranks: (9, 2) -> [4, 5]."""
    base, extra = divmod(n, world)
    return [base + (1 if r >= world - extra else 0) for r in range(world)]


def shard_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous share of n items (see `split_sizes`)."""
    sizes = split_sizes(n, world)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


@dataclass(frozen=True)
class TPShard:
    """What `apply_tensor_parallel` did to a model: attached as `model.tp`."""

    rank: int
    world: int
    global_args: ModelArgs  # the unsplit model's description
    heads: tuple[int, int]  # [start, end) of this rank's query heads
    kv_heads: tuple[int, int]  # [start, end) of this rank's KV heads
    ffn: tuple[int, int]  # [start, end) of this rank's intermediate features


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local^T) + b: the input features are split over the ranks, each rank computes a
    partial sum of the full output, and the SUM all-reduce completes it on every rank (Megatron-LM's `g` operator).
    The bias, if any, is added once after the reduce instead of `world` times inside it."""

    def __init__(self, linear: nn.Linear, start: int, end: int, group=None):
        super().__init__()
        # clone: a view would keep the full [out, in] weight alive
        self.weight = nn.Parameter(linear.weight[:, start:end].clone(), requires_grad=False)  # [out, in_local]
        self.bias = linear.bias  # [out] replicated, or None
        self.in_features, self.out_features = end - start, linear.out_features
        self.group = group
        self.local: nn.Module | None = None  # the local product, when `pack_fp16_weights` has replaced `weight`

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in_local] -> [..., out]
        y = F.linear(x, self.weight) if self.local is None else self.local(x)  # partial sum over local features
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features} (local), out_features={self.out_features}, all_reduce=SUM"


def _colwise(linear: nn.Linear, start: int, end: int) -> None:
    """Keep output features [start, end) of a linear layer (and its bias), in place."""
    linear.weight = nn.Parameter(linear.weight[start:end].clone(), requires_grad=False)  # [out_local, in]
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias[start:end].clone(), requires_grad=False)  # [out_local]
    linear.out_features = end - start


def plan_shard(args: ModelArgs, rank: int, world: int) -> TPShard:
    """The head and feature ranges rank owns; raises ValueError for a split that cannot work."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid tensor-parallel rank {rank} of world {world}")
    if args.num_heads % args.num_kv_heads:
        raise ValueError(f"{args.num_heads} query heads do not form groups over {args.num_kv_heads} KV heads")
    if world > args.num_kv_heads:
        raise ValueError(f"cannot split {args.num_kv_heads} KV heads over {world} ranks: tensor parallelism splits "
                         f"by whole KV heads, so the group may have at most {args.num_kv_heads} ranks")
    if world > args.intermediate_size:
        raise ValueError(f"cannot split an intermediate size of {args.intermediate_size} over {world} ranks")
    group = args.num_heads // args.num_kv_heads  # query heads per KV head
    kv0, kv1 = shard_range(args.num_kv_heads, world, rank)
    return TPShard(rank=rank, world=world, global_args=args, heads=(kv0 * group, kv1 * group), kv_heads=(kv0, kv1),
                   ffn=shard_range(args.intermediate_size, world, rank))


@torch.no_grad()
def apply_tensor_parallel(model: Decoder, rank: int, world: int, group=None) -> Decoder:
    """Shard `model` in place for rank `rank` of a tensor-parallel group of `world` ranks and return it.

    Every rank of the group must apply the same transformation to the same weights, then allocate its KV cache
    with `model.new_cache` (local KV heads) and run every forward pass in lockstep with the others (each
    row-parallel layer all-reduces over `group`; None is the default process group). world == 1 is a no-op.
    The process group is needed only when the model runs, not here.
    """
    if getattr(model, "tp", None) is not None:
        raise ValueError("apply_tensor_parallel was already applied to this model")
    if model.packed_lm_head is not None:
        raise ValueError("shard the model before packing its weights (load it with pack=False, then "
                         "apply_tensor_parallel, then pack_fp16_weights)")
    shard = plan_shard(model.args, rank, world)
    if world == 1:
        return model
    hd = model.args.head_dim
    h0, h1 = shard.heads
    kv0, kv1 = shard.kv_heads
    f0, f1 = shard.ffn
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        _colwise(attn.q_proj, h0 * hd, h1 * hd)  # [n_heads_local * hd, d]
        _colwise(attn.k_proj, kv0 * hd, kv1 * hd)  # [n_kv_local * hd, d]
        _colwise(attn.v_proj, kv0 * hd, kv1 * hd)
        attn.o_proj = RowParallelLinear(attn.o_proj, h0 * hd, h1 * hd, group)  # [d, n_heads_local * hd]
        attn.n_heads, attn.n_kv = h1 - h0, kv1 - kv0  # Attention.forward reshapes with these
        _colwise(mlp.gate_proj, f0, f1)  # [ffn_local, d]
        _colwise(mlp.up_proj, f0, f1)
        mlp.down_proj = RowParallelLinear(mlp.down_proj, f0, f1, group)  # [d, ffn_local]
    model.args = dataclasses.replace(model.args, num_heads=h1 - h0, num_kv_heads=kv1 - kv0,
                                     intermediate_size=f1 - f0)
    model.tp = shard
    return model
