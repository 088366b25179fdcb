"""One target replica as one tensor-parallel group: rank 0 leads, the other ranks follow.

Only the leader runs the engine: it owns the requests, the drafter, the verifier and the KV cache bookkeeping.
Followers hold their shard of the model (`workers/models/tp.py`) and a KV cache of their local heads, and do one
thing: run the same forward pass as the leader, at the same time, so that the all-reduces inside the row-parallel
layers meet. Before every forward the leader broadcasts a step plan (torch.distributed.broadcast, as Megatron-LM
and vLLM broadcast their per-step metadata from the driver rank; no pickle):

    header  int64 [HEADER_LEN]: op, B, T, logits mode, n_hidden, cache num_slots, cache capacity, payload length
    payload int64 [B*T + 3B + n_hidden] (op FORWARD): tokens [B, T] flattened, slots [B],
            cache lengths before the step [B], num_new [B], hidden_layers [n_hidden]
            (+ tree parents [B, T] flattened when the plan's mode says the rows are token trees)
    payload int64 [2B] (op SYNC_LENGTHS): slots [B], lengths [B]
    payload int64 [2 + m] (op COMPACT): slot, start, m offsets (`KVCache.compact` after a tree was verified)
    no payload (op SHUTDOWN)

A follower sets its cache lengths from the plan before each forward, so the leader's rollbacks after verification
(`KVCache.rollback`: only a length changes) need no message of their own; SYNC_LENGTHS exists for a caller that
wants followers' lengths exact between steps. Followers discard logits: they run the forward with logits="last"
and no hidden layers, which changes nothing they compute before the LM head (replicated, no collective); a
vocab-parallel LM head would make them follow the plan's logits mode instead.

`TPLeader` has the signature of `Decoder.__call__` and is handed to `TargetRunner` (its `forward` argument), so the
engine loop is the same for one rank and for a group. `follower_loop` is all a follower process runs.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from workers.models.decoder import Decoder, ForwardOutput
from workers.models.kv_cache import KVCache

OP_FORWARD, OP_SYNC_LENGTHS, OP_SHUTDOWN, OP_COMPACT = 1, 2, 3, 4
TREE_FLAG = 8  # or-ed into the plan's mode: a tree payload follows the tokens
LOGITS_MODES = ("all", "last")
HEADER_LEN = 8


def init_process_group(
    rank: int,
    world: int,
    master_addr: str,
    master_port: int,
    backend: str | None = None,
    timeout_s: float | None = None,
) -> str:
    """Join the default process group of one TP group over TCP and return the backend: NCCL when CUDA is
    available (each rank then uses GPU rank % device_count; under Ray each worker sees only its own GPU), gloo on
    CPU. timeout_s bounds every collective (None: torch's default)."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    host = f"[{master_addr}]" if ":" in master_addr else master_addr  # IPv6 literal
    kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    dist.init_process_group(backend, init_method=f"tcp://{host}:{master_port}", rank=rank, world_size=world,
                            **kwargs)
    return backend


def _comm(group) -> tuple[int, torch.device]:
    """The leader's global rank and the device collectives of `group` need their tensors on."""
    src = 0 if group is None else dist.get_global_rank(group, 0)
    nccl = dist.get_backend(group) == "nccl"
    return src, torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def _ints(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long)


class TPLeader:
    """Rank 0's model forward: broadcast the step plan, then run the local shard. Call it like the model."""

    def __init__(self, model: Decoder, group=None):
        self.model = model
        self.group = group
        self.src, self.device = _comm(group)
        self.closed = False
        self.num_steps = 0  # forward passes run by the group

    def _send(self, op: int, cache: KVCache | None, B: int = 0, T: int = 0, mode: int = 0, n_hidden: int = 0,
              payload: torch.Tensor | None = None) -> None:
        if self.closed:
            raise RuntimeError("the tensor-parallel group was shut down")
        slots, capacity = (cache.num_slots, cache.capacity) if cache is not None else (0, 0)
        n = 0 if payload is None else payload.numel()
        header = _ints([op, B, T, mode, n_hidden, slots, capacity, n]).to(self.device)  # [HEADER_LEN]
        dist.broadcast(header, self.src, group=self.group)
        if payload is not None:
            dist.broadcast(payload.to(self.device), self.src, group=self.group)

    def __call__(
        self,
        tokens: torch.Tensor,  # [B, T] long
        cache: KVCache,
        slots: list[int],  # [B]
        num_new: list[int] | None = None,  # [B]
        logits: str = "all",
        hidden_layers: tuple[int, ...] = (),
        inputs_embeds: torch.Tensor | None = None,
        tree: torch.Tensor | None = None,
    ) -> ForwardOutput:
        if inputs_embeds is not None:
            raise NotImplementedError("inputs_embeds is not part of the tensor-parallel step plan")
        if logits not in LOGITS_MODES:
            raise ValueError(f"logits must be one of {LOGITS_MODES}, got {logits!r}")
        B, T = tokens.shape
        num_new = list(num_new) if num_new else [T] * B
        starts = [cache.lengths[s] for s in slots]  # [B]
        if max(starts) + T > cache.capacity:  # fail here, before the followers are committed to a forward
            raise ValueError(f"sequence would exceed the KV cache capacity of {cache.capacity} positions")
        payload = torch.cat([tokens.reshape(-1).long().cpu(), _ints(slots), _ints(starts), _ints(num_new),
                             _ints(hidden_layers)])  # [B*T + 3B + n_hidden]
        mode = LOGITS_MODES.index(logits)
        if tree is not None:
            payload = torch.cat([payload, tree.reshape(-1).long().cpu()])
            mode |= TREE_FLAG
        self._send(OP_FORWARD, cache, B, T, mode, len(hidden_layers), payload)
        self.num_steps += 1
        return self.model(tokens, cache, slots, num_new=num_new, logits=logits, hidden_layers=hidden_layers,
                          tree=tree)

    def compact(self, cache: KVCache, slot: int, start: int, offsets: list[int]) -> None:
        """`KVCache.compact` on every rank."""
        self._send(OP_COMPACT, cache, payload=_ints([slot, start, *offsets]))
        cache.compact(slot, start, offsets)

    def sync_lengths(self, cache: KVCache, slots: list[int] | None = None) -> None:
        """Make the followers' cache lengths of `slots` (default: all) equal to the leader's now."""
        slots = list(range(cache.num_slots)) if slots is None else list(slots)
        lengths = [cache.lengths[s] for s in slots]
        self._send(OP_SYNC_LENGTHS, cache, B=len(slots), payload=torch.cat([_ints(slots), _ints(lengths)]))

    def shutdown(self) -> None:
        """Release the followers from `follower_loop` (idempotent). The caller then destroys the process group."""
        if not self.closed:
            self._send(OP_SHUTDOWN, None)
            self.closed = True


@torch.inference_mode()
def follower_loop(model: Decoder, cache: KVCache | None = None, group=None) -> dict[str, int]:
    """Run the leader's step plans on this rank's shard until it sends SHUTDOWN; returns how many plans of each
    kind were run. `cache` must have the leader's geometry (same num_slots and capacity, local KV heads); None
    allocates it with `model.new_cache` from the geometry in the first plan, so a follower need not know how the
    leader's `TargetRunner` sized its cache."""
    src, device = _comm(group)
    counts = {"forward": 0, "sync_lengths": 0, "compact": 0}
    header = torch.empty(HEADER_LEN, dtype=torch.long, device=device)
    while True:
        dist.broadcast(header, src, group=group)
        # host sync: the plan decides host-side control flow (shapes, slots, cache lengths)
        op, B, T, mode, n_hidden, num_slots, capacity, n = header.tolist()
        if op == OP_SHUTDOWN:
            return counts
        if cache is None:
            cache = model.new_cache(num_slots, capacity)
        if (num_slots, capacity) != (cache.num_slots, cache.capacity):
            raise RuntimeError(f"follower KV cache has {cache.num_slots} slots x {cache.capacity} positions, the "
                               f"leader's has {num_slots} x {capacity}: allocate both with the same sizes")
        payload = torch.empty(n, dtype=torch.long, device=device)
        dist.broadcast(payload, src, group=group)
        if op == OP_SYNC_LENGTHS:
            host = payload.tolist()
            for s, length in zip(host[:B], host[B:]):
                cache.lengths[s] = length
            counts["sync_lengths"] += 1
        elif op == OP_COMPACT:
            host = payload.tolist()
            cache.compact(host[0], host[1], host[2:])
            counts["compact"] += 1
        elif op == OP_FORWARD:
            tokens = payload[: B * T].view(B, T).to(model.device)  # [B, T]
            rest = B * T + 3 * B + n_hidden
            host = payload[B * T: rest].tolist()  # slots, starts, num_new, hidden_layers
            slots, starts, num_new = host[:B], host[B: 2 * B], host[2 * B: 3 * B]
            tree = payload[rest:].view(B, T) if mode & TREE_FLAG else None
            for s, start in zip(slots, starts):
                cache.lengths[s] = start
            model(tokens, cache, slots, num_new=num_new, logits="last", tree=tree)
            counts["forward"] += 1
        else:
            raise RuntimeError(f"unknown tensor-parallel op {op} from the leader")
