"""A slot-based KV cache for a batch of sequences at different lengths.

Each sequence owns one slot: a row of a preallocated [slots, kv_heads, capacity, head_dim] tensor per layer.
A sequence's length is the number of valid positions in its slot; rolling a sequence back to position p is just
setting its length to p (positions past the length are never attended to, and the next write overwrites them).
That makes speculative rollback free and lets one forward pass write k + 1 new positions per sequence.

Capacity includes headroom past the model's context for the padded draft positions of the last step.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        capacity: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        shape = (num_slots, num_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity
        self.lengths = [0] * num_slots  # valid positions per slot (host-side: no device sync to read)
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def num_slots(self) -> int:
        return len(self.lengths)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("KV cache has no free slot")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0
        self._free.append(slot)

    def rollback(self, slot: int, length: int) -> None:
        """Forget every position >= length of this slot."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot roll slot {slot} of length {self.lengths[slot]} back to {length}")
        self.lengths[slot] = length

    def compact(self, slot: int, start: int, offsets: list[int]) -> None:
        """Move the entries at start + offsets[i] to start + i (every layer): after a token tree was verified,
        the accepted path becomes a contiguous prefix again. offsets ascend and offsets[i] >= i."""
        if offsets == list(range(len(offsets))):
            return  # the path is already where it belongs (a chain, or the first branch)
        src = torch.tensor(offsets, device=self.k[0].device) + start
        end = start + len(offsets)
        for cache in (self.k, self.v):
            for t in cache:
                t[slot, :, start:end] = t[slot, :, src]  # the gather copies before the write

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """slots: [B]; positions: [B, T]; k, v: [B, kv_heads, T, head_dim]."""
        idx = slots[:, None]
        self.k[layer][idx, :, positions] = k.transpose(1, 2)
        self.v[layer][idx, :, positions] = v.transpose(1, 2)

    def read(self, layer: int, slots: torch.Tensor | slice, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [0, length) for the given slots: 2 x [B, kv_heads, length, head_dim].
        A slice of contiguous slots returns views (no copy); an index tensor gathers."""
        return self.k[layer][slots, :, :length], self.v[layer][slots, :, :length]
