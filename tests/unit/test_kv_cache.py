"""KVCache: slot bookkeeping, rollback semantics, and the gather path for non-contiguous slots.

Rollback is what makes speculative decoding cheap here: rejected positions are forgotten by moving the slot's
length back, and the next write overwrites them. These tests check, through real forwards of the tiny llama and
gemma3 (whose sliding window makes stale positions easy to leak), that a rolled back and rewritten slot scores
exactly like a slot that never saw the rejected tokens.
"""

from __future__ import annotations

import pytest
import torch

from workers.models.kv_cache import KVCache
from workers.models.loader import load_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module", params=("llama", "gemma3"))
def model(request, tiny_models):
    return load_model(str(tiny_models[request.param]), dtype="fp32").model


def _tokens(n: int, seed: int, vocab: int = 384) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- bookkeeping


def test_allocate_and_free():
    cache = KVCache(num_layers=1, num_slots=3, capacity=4, num_kv_heads=1, head_dim=2, dtype=torch.float32)
    assert cache.num_slots == 3 and cache.num_free == 3
    slots = [cache.allocate() for _ in range(3)]
    assert sorted(slots) == [0, 1, 2]
    assert slots[0] == 0  # lowest slot first: a fresh batch gets contiguous slots
    assert cache.num_free == 0
    with pytest.raises(RuntimeError, match="no free slot"):
        cache.allocate()
    cache.lengths[slots[1]] = 3
    cache.free(slots[1])
    assert cache.num_free == 1
    assert cache.lengths[slots[1]] == 0
    again = cache.allocate()
    assert again == slots[1]
    assert cache.lengths[again] == 0


def test_rollback_bounds():
    cache = KVCache(1, 2, 8, 1, 2, torch.float32)
    slot = cache.allocate()
    cache.lengths[slot] = 5
    cache.rollback(slot, 5)  # a no-op rollback is allowed
    cache.rollback(slot, 2)
    assert cache.lengths[slot] == 2
    with pytest.raises(ValueError, match="cannot roll"):
        cache.rollback(slot, 3)  # rolling forward would expose positions that were forgotten
    with pytest.raises(ValueError, match="cannot roll"):
        cache.rollback(slot, -1)
    cache.rollback(slot, 0)
    assert cache.lengths[slot] == 0


def test_write_and_read_shapes():
    cache = KVCache(num_layers=2, num_slots=3, capacity=6, num_kv_heads=2, head_dim=4, dtype=torch.float32)
    k = torch.randn(2, 2, 3, 4)  # [B, kv_heads, T, head_dim]
    v = torch.randn(2, 2, 3, 4)
    slots = torch.tensor([2, 0])
    positions = torch.tensor([[1, 2, 3], [0, 1, 2]])
    cache.write(1, slots, positions, k, v)
    keys, values = cache.read(1, slots, 4)
    assert keys.shape == (2, 2, 4, 4)
    torch.testing.assert_close(keys[0, :, 1:4], k[0])
    torch.testing.assert_close(values[1, :, 0:3], v[1])
    assert keys[0, :, 0].abs().sum() == 0  # position 0 of slot 2 never written
    assert cache.k[0].abs().sum() == 0  # other layers untouched
    view, _ = cache.read(1, slice(0, 2), 4)
    assert view.data_ptr() == cache.k[1].data_ptr()  # contiguous slots come back as a view, no copy


# ----------------------------------------------------------------------------------- rollback through a model


def test_rollback_then_rewrite_equals_never_written(model):
    """Write a prompt, then a block of 'draft' tokens that is partly rejected, roll back, write the target's own
    continuation: the logits must equal those of a cache that only ever saw the accepted tokens."""
    prompt, drafts, truth = _tokens(10, 0), _tokens(6, 1), _tokens(5, 2)
    accepted = 2  # drafts[:2] accepted, drafts[2:] rejected
    cache = model.new_cache(2, 64)
    slot = cache.allocate()
    model(prompt[None], cache, [slot])
    model(drafts[None], cache, [slot])
    assert cache.lengths[slot] == 16
    cache.rollback(slot, 10 + accepted)
    rewritten = model(truth[None], cache, [slot]).logits

    clean = model.new_cache(1, 64)
    model(torch.cat([prompt, drafts[:accepted]])[None], clean, [0])
    expected = model(truth[None], clean, [0]).logits
    torch.testing.assert_close(rewritten, expected, atol=1e-5, rtol=0)
    assert cache.lengths[slot] == clean.lengths[0] == 17


def test_rollback_then_shorter_rewrite_does_not_see_stale_positions(model):
    """After a rollback, positions past the new length still hold the rejected keys: a rewrite shorter than what
    was rolled back must not attend to them (one token decode is the decoder's mask-free fast path)."""
    prompt, drafts = _tokens(12, 3), _tokens(8, 4)
    cache = model.new_cache(1, 64)
    model(prompt[None], cache, [0])
    model(drafts[None], cache, [0])
    cache.rollback(0, 12)
    step = torch.tensor([[7]])
    got = [model(step, cache, [0]).logits]
    got.append(model(step, cache, [0]).logits)

    clean = model.new_cache(1, 64)
    model(prompt[None], clean, [0])
    expected = [model(step, clean, [0]).logits, model(step, clean, [0]).logits]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)


def test_rolled_back_slot_in_a_padded_batch(model):
    """Rows at different lengths, one rolled back, verified together in one padded forward (an engine step)."""
    a, b = _tokens(9, 5), _tokens(14, 6)
    cache = model.new_cache(2, 64)
    model(torch.stack([torch.cat([a, torch.zeros(5, dtype=torch.long)]), b]), cache, [0, 1], num_new=[9, 14])
    model(_tokens(4, 7)[None].expand(2, 4), cache, [0, 1])  # a block for both rows...
    cache.rollback(0, 10)  # ...row 0 keeps one of it
    cache.rollback(1, 14)  # ...row 1 none
    block = torch.stack([_tokens(3, 8), _tokens(3, 9)])
    got = model(block, cache, [0, 1], num_new=[3, 2]).logits
    assert cache.lengths == [13, 16]

    for row, ctx, n in ((0, torch.cat([a, _tokens(4, 7)[:1]]), 3), (1, b, 2)):
        clean = model.new_cache(1, 64)
        model(ctx[None], clean, [0])
        expected = model(block[row : row + 1, :n], clean, [0]).logits
        torch.testing.assert_close(got[row, :n], expected[0], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ gather vs slice


@pytest.mark.parametrize("slots", [[2, 0], [3, 1], [1, 0]])
def test_noncontiguous_slots_match_contiguous(model, slots):
    """Rows in slots that are not a contiguous ascending run take the gather path: same logits as slots [0, 1]."""
    rows = [_tokens(11, 10), _tokens(7, 11)]
    prefill = torch.zeros(2, 11, dtype=torch.long)
    prefill[0], prefill[1, :7] = rows[0], rows[1]
    steps = [torch.stack([_tokens(3, 12 + i), _tokens(3, 20 + i)]) for i in range(3)]

    def run(slot_ids: list[int]) -> list[torch.Tensor]:
        cache = model.new_cache(4, 64)
        out = [model(prefill, cache, slot_ids, num_new=[11, 7]).logits]
        for block in steps:
            out.append(model(block, cache, slot_ids, num_new=[3, 2]).logits)
            cache.rollback(slot_ids[1], cache.lengths[slot_ids[1]] - 1)  # row 1 keeps only one of its two
        assert [cache.lengths[s] for s in slot_ids] == [20, 10]
        return out

    got, expected = run(slots), run([0, 1])
    for i, real in enumerate([(11, 7)] + [(3, 2)] * len(steps)):  # compare real positions only, not padding
        for row, n in enumerate(real):
            torch.testing.assert_close(got[i][row, :n], expected[i][row, :n], atol=1e-5, rtol=0)
