"""Our `Decoder` against transformers' reference implementation, for every supported family.

The tiny random models of `conftest.py` are loaded twice: by `workers.models.loader.load_model` into our decoder and
by `AutoModelForCausalLM.from_pretrained`. Transformers runs each row alone and unpadded; our decoder runs the same
rows as one padded batch of two rows of different lengths, once in a single forward and once incrementally
(a prefill, a chunk, then one token at a time), the way the engine feeds it. Gemma 3 uses sequences longer than its
sliding window (8) so the windowed layers must mask correctly, including after the window has slid.
"""

from __future__ import annotations

import pytest
import torch

from workers.models.loader import load_model

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")
ATOL = 1e-4
LENGTHS = (21, 13)  # two rows of different lengths; both longer than gemma3's sliding window of 8

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tiny_models):
    from transformers import AutoModelForCausalLM

    path = tiny_models[request.param]
    ours = load_model(str(path), dtype="fp32")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return request.param, ours, ref


def _rows(vocab: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in LENGTHS]


@torch.no_grad()
def _reference(ref, rows: list[torch.Tensor]) -> list:
    """transformers on each row alone: logits [L, V] and hidden_states (tuple of [L, d])."""
    out = []
    for r in rows:
        o = ref(r[None], output_hidden_states=True)
        out.append((o.logits[0].float(), [h[0] for h in o.hidden_states]))
    return out


def _padded(rows: list[torch.Tensor], lens: list[int], offsets: list[int]) -> torch.Tensor:
    """[B, max(lens)] with row b holding rows[b][offsets[b] : offsets[b] + lens[b]], zero padded."""
    tokens = torch.zeros(len(rows), max(max(lens), 1), dtype=torch.long)
    for b, (r, n, o) in enumerate(zip(rows, lens, offsets)):
        tokens[b, :n] = r[o : o + n]
    return tokens


def test_single_forward_matches_transformers(family):
    name, ours, ref = family
    rows = _rows(ours.vocab_size)
    expected = _reference(ref, rows)
    model = ours.model
    cache = model.new_cache(2, 64)
    out = model(_padded(rows, list(LENGTHS), [0, 0]), cache, [0, 1], num_new=list(LENGTHS))
    assert out.logits.dtype == torch.float32
    assert out.logits.shape == (2, max(LENGTHS), ours.vocab_size)
    assert cache.lengths == list(LENGTHS)
    for b, n in enumerate(LENGTHS):
        torch.testing.assert_close(out.logits[b, :n], expected[b][0], atol=ATOL, rtol=0, msg=f"{name} row {b}")


def test_last_logits_pick_each_rows_last_real_token(family):
    name, ours, ref = family
    rows = _rows(ours.vocab_size, seed=1)
    expected = _reference(ref, rows)
    cache = ours.model.new_cache(2, 64)
    out = ours.model(_padded(rows, list(LENGTHS), [0, 0]), cache, [0, 1], num_new=list(LENGTHS), logits="last")
    assert out.logits.shape == (2, 1, ours.vocab_size)
    for b in range(2):
        torch.testing.assert_close(out.logits[b, 0], expected[b][0][-1], atol=ATOL, rtol=0, msg=name)


def test_incremental_forward_matches_transformers(family):
    """Prefill part of each row, then a chunk, then one token at a time; rows advance by different amounts."""
    name, ours, ref = family
    rows = _rows(ours.vocab_size, seed=2)
    expected = _reference(ref, rows)
    model = ours.model
    cache = model.new_cache(2, 64)
    done = [0, 0]
    got: list[list[torch.Tensor]] = [[], []]

    def feed(slots: list[int], counts: list[int]):
        out = model(_padded([rows[s] for s in slots], counts, [done[s] for s in slots]), cache, slots, num_new=counts)
        for j, s in enumerate(slots):
            got[s].append(out.logits[j, : counts[j]])
            done[s] += counts[j]
            assert cache.lengths[s] == done[s]

    feed([0, 1], [6, 3])  # prefill of different lengths
    feed([0, 1], [5, 7])  # a multi-token chunk (a verification step): row 1 now passes the sliding window
    while done[1] < LENGTHS[1]:  # both rows one token at a time
        feed([0, 1], [1, 1])
    while done[0] < LENGTHS[0]:  # row 0 alone: batch 1, one token (the decoder's mask-free fast path)
        feed([0], [1])
    for b, n in enumerate(LENGTHS):
        logits = torch.cat(got[b])
        assert logits.shape[0] == n
        torch.testing.assert_close(logits, expected[b][0], atol=ATOL, rtol=0, msg=f"{name} row {b}")


def test_single_row_decode_past_the_window(family):
    """Batch 1, T = 1 for a whole sequence: gemma3's windowed layers must mask once kv_len > window."""
    name, ours, ref = family
    row = _rows(ours.vocab_size, seed=3)[0]
    expected = _reference(ref, [row])[0][0]
    cache = ours.model.new_cache(1, 64)
    logits = torch.cat([ours.model(row[None, i : i + 1], cache, [0]).logits[0] for i in range(len(row))])
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0, msg=name)


def test_hidden_layers_match_transformers_hidden_states(family):
    name, ours, ref = family
    rows = _rows(ours.vocab_size, seed=4)
    expected = _reference(ref, rows)
    model = ours.model
    n_layers, d = model.args.num_layers, model.args.hidden_size
    layers = tuple(range(n_layers - 1))  # transformers' last hidden state has the final norm applied: skip it
    picked = (layers[-1], 0) if len(layers) > 1 else layers  # order is the caller's, not sorted
    cache = model.new_cache(2, 64)
    out = model(_padded(rows, list(LENGTHS), [0, 0]), cache, [0, 1], num_new=list(LENGTHS), hidden_layers=picked)
    assert out.hidden is not None
    assert out.hidden.shape == (2, max(LENGTHS), len(picked) * d)
    assert out.hidden.dtype == model.dtype
    for b, n in enumerate(LENGTHS):
        for j, layer in enumerate(picked):
            torch.testing.assert_close(out.hidden[b, :n, j * d : (j + 1) * d], expected[b][1][layer + 1],
                                       atol=ATOL, rtol=0, msg=f"{name} layer {layer} row {b}")
    # The final layer's output, normed by us, is transformers' last hidden state.
    out = model(_padded(rows, list(LENGTHS), [0, 0]), model.new_cache(2, 64), [0, 1], num_new=list(LENGTHS),
                hidden_layers=(n_layers - 1,))
    torch.testing.assert_close(model.norm(out.hidden[0, : LENGTHS[0]]), expected[0][1][-1], atol=ATOL, rtol=0)


def test_no_hidden_layers_returns_none(family):
    _, ours, _ = family
    out = ours.model(torch.tensor([[1, 2, 3]]), ours.model.new_cache(1, 8), [0])
    assert out.hidden is None


def test_bf16_load_is_close(family, tiny_models):
    name, ours, ref = family
    bf16 = load_model(str(tiny_models[name]), dtype="bf16")
    assert bf16.model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    rows = _rows(ours.vocab_size, seed=5)
    expected = _reference(ref, rows)
    out = bf16.model(_padded(rows, list(LENGTHS), [0, 0]), bf16.model.new_cache(2, 64), [0, 1],
                     num_new=list(LENGTHS))
    assert out.logits.dtype == torch.float32  # logits always come back in float32
    agree, total = 0, 0
    for b, n in enumerate(LENGTHS):
        ref_logits = expected[b][0]
        got = out.logits[b, :n]
        assert torch.isfinite(got).all()
        scale = ref_logits.abs().max()
        assert (got - ref_logits).abs().max() < 0.15 * scale, name
        agree += int((got.argmax(-1) == ref_logits.argmax(-1)).sum())
        total += n
    assert agree / total >= 0.75, f"{name}: bf16 argmax agrees on only {agree}/{total} positions"


def test_forward_past_cache_capacity_is_refused(family):
    _, ours, _ = family
    cache = ours.model.new_cache(1, 8)
    ours.model(torch.zeros(1, 6, dtype=torch.long), cache, [0])
    with pytest.raises(ValueError, match="capacity"):
        ours.model(torch.zeros(1, 3, dtype=torch.long), cache, [0])
    assert cache.lengths == [6]  # a refused forward leaves the slot alone


@pytest.mark.parametrize("heads, kv, T, masked", [(9, 3, 1, True), (9, 3, 5, True), (8, 2, 1, False), (4, 4, 3, True)])
def test_attend_folds_grouped_queries_exactly(heads, kv, T, masked):
    from workers.models.decoder import attend

    g = torch.Generator().manual_seed(0)
    B, L, hd = 3, 11, 16
    q = torch.randn(B, heads, T, hd, generator=g)
    k, v = torch.randn(B, kv, L, hd, generator=g), torch.randn(B, kv, L, hd, generator=g)
    mask = None
    if masked:  # row b, query t sees keys <= L - T + t - b (a ragged causal mask)
        pos = torch.arange(T)[None, :] + L - T - torch.arange(B)[:, None]  # [B, T]
        mask = (torch.arange(L)[None, None, :] <= pos[:, :, None])[:, None]  # [B, 1, T, L]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv)
    torch.testing.assert_close(attend(q, k, v, mask), want, rtol=1e-5, atol=1e-6)


def test_attend_accepts_a_non_contiguous_attention_output(monkeypatch):
    """CUDA's fused attention kernels return their output in a transposed (non-contiguous) layout; attend must not
    assume CPU's contiguous one (a .view there crashed the first GPU forward). Simulated here on CPU."""
    import workers.models.decoder as decoder

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def transposed_layout(q, k, v, **kw):  # same values, stored as [B, T, heads, hd] like the flash kernel's output
        out = sdpa(q, k, v, **kw)
        return out.transpose(1, 2).contiguous().transpose(1, 2)

    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 9, 4, 16, generator=g)
    k, v = torch.randn(2, 3, 7, 16, generator=g), torch.randn(2, 3, 7, 16, generator=g)
    want = decoder.attend(q, k, v, None)
    monkeypatch.setattr(decoder.F, "scaled_dot_product_attention", transposed_layout)
    assert not transposed_layout(q.reshape(2, 3, 12, 16), k, v).is_contiguous()
    torch.testing.assert_close(decoder.attend(q, k, v, None), want)
