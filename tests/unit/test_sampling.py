"""filter_logits_to_probs on hand-computed rows, and the reproducibility contract of sample_from_probs."""

from __future__ import annotations

import math

import pytest
import torch

from workers.verify.sampling import filter_logits_to_probs, sample_from_probs


def _filter(logits, temperature, top_k=0, top_p=1.0):
    logits = torch.tensor(logits, dtype=torch.float32)
    n = logits.shape[0]
    return filter_logits_to_probs(
        logits,
        torch.full((n,), float(temperature)),
        torch.full((n,), int(top_k), dtype=torch.long),
        torch.full((n,), float(top_p)),
    )


def _softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_no_filter_is_softmax_of_scaled_logits():
    logits = [0.5, -1.0, 2.0, 0.0]
    for temperature in (0.5, 1.0, 2.0):
        probs = _filter([logits], temperature)[0]
        expected = torch.tensor(_softmax([v / temperature for v in logits]))
        torch.testing.assert_close(probs, expected)


def test_top_k_keeps_exactly_k_even_with_ties():
    # Tokens 1, 2 and 3 tie; top_k=2 keeps the first two in (stable) sort order: tokens 1 and 2.
    probs = _filter([[0.0, 3.0, 3.0, 3.0, 1.0]], 1.0, top_k=2)[0]
    torch.testing.assert_close(probs, torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0]))
    probs = _filter([[4.0, 1.0, 3.0, 2.0]], 1.0, top_k=3)[0]
    torch.testing.assert_close(probs, torch.tensor(_softmax([4.0, -math.inf, 3.0, 2.0])))


@pytest.mark.parametrize("top_k", [0, 4, 100])
def test_top_k_off_or_at_least_vocab_keeps_everything(top_k):
    probs = _filter([[4.0, 1.0, 3.0, 2.0]], 1.0, top_k=top_k)[0]
    torch.testing.assert_close(probs, torch.tensor(_softmax([4.0, 1.0, 3.0, 2.0])))


def test_top_p_keeps_smallest_prefix_reaching_p():
    # Probabilities 0.5, 0.25, 0.15, 0.1 (logits are their logs).
    logits = [[math.log(0.1), math.log(0.5), math.log(0.25), math.log(0.15)]]
    cases = {
        0.4: [0.0, 1.0, 0.0, 0.0],  # 0.5 alone reaches 0.4
        0.5: [0.0, 1.0, 0.0, 0.0],  # exactly reached by the top token
        0.6: [0.0, 0.5 / 0.75, 0.25 / 0.75, 0.0],
        0.8: [0.0, 0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9],
        0.95: [0.1, 0.5, 0.25, 0.15],
        1e-6: [0.0, 1.0, 0.0, 0.0],  # at least one token survives
    }
    for top_p, expected in cases.items():
        probs = _filter(logits, 1.0, top_p=top_p)[0]
        torch.testing.assert_close(probs, torch.tensor(expected), msg=f"top_p={top_p}")


def test_top_p_is_measured_after_top_k_and_temperature():
    logits = [[math.log(0.1), math.log(0.5), math.log(0.25), math.log(0.15)]]
    # top_k=2 leaves 0.5 / 0.75 = 2/3 and 1/3; top_p=0.6 is reached by the first alone.
    torch.testing.assert_close(_filter(logits, 1.0, top_k=2, top_p=0.6)[0], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    # Without top_k the first holds only 0.5 < 0.6, so two tokens survive.
    assert int((_filter(logits, 1.0, top_p=0.6)[0] > 0).sum()) == 2
    # Temperature 0.5 squares the odds: 0.25, 0.0625, 0.0225, 0.01 (over 0.345) -> the top token alone has 0.72.
    torch.testing.assert_close(_filter(logits, 0.5, top_p=0.7)[0], torch.tensor([0.0, 1.0, 0.0, 0.0]))


def test_rows_are_filtered_independently():
    logits = torch.tensor([[4.0, 1.0, 3.0, 2.0]] * 4)
    probs = filter_logits_to_probs(
        logits,
        torch.tensor([1.0, 0.0, 2.0, 1.0]),
        torch.tensor([0, 0, 2, 0]),
        torch.tensor([1.0, 1.0, 1.0, 0.3]),
    )
    torch.testing.assert_close(probs[0], torch.tensor(_softmax([4.0, 1.0, 3.0, 2.0])))
    torch.testing.assert_close(probs[1], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(probs[2], torch.tensor(_softmax([2.0, -math.inf, 1.5, -math.inf])))
    torch.testing.assert_close(probs[3], torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_greedy_rows_are_one_hot_on_first_argmax_and_ignore_filters():
    logits = torch.tensor([[0.0, 5.0, 5.0, 1.0], [-3.0, -1.0, -2.0, -1.5]], dtype=torch.bfloat16)
    probs = filter_logits_to_probs(logits, torch.zeros(2), torch.tensor([1, 3]), torch.tensor([0.1, 0.5]))
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]))


def test_rows_sum_to_one_for_random_settings():
    gen = torch.Generator().manual_seed(0)
    n, vocab = 64, 50
    probs = filter_logits_to_probs(
        torch.randn(n, vocab, generator=gen) * 3,
        torch.rand(n, generator=gen) * 2,
        torch.randint(0, vocab + 5, (n,), generator=gen),
        torch.rand(n, generator=gen) * 0.9 + 0.1,
    )
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(n))
    assert bool((probs >= 0).all())


def test_sample_follows_probs():
    torch.manual_seed(1)
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    tokens = sample_from_probs(probs.expand(200_000, 4), None)
    freq = torch.bincount(tokens, minlength=4).float() / tokens.numel()
    assert float(freq[1]) == 0.0
    torch.testing.assert_close(freq, probs, atol=5e-3, rtol=0)


def test_seeded_rows_reproducible_and_independent_of_batch_position():
    vocab = 1000
    row = torch.softmax(torch.randn(vocab, generator=torch.Generator().manual_seed(2)), dim=0)

    def sample_alone(seed):
        return int(sample_from_probs(row.unsqueeze(0), [torch.Generator().manual_seed(seed)])[0])

    # Same seed, same row, at different positions of batches with different neighbours and sizes.
    batch = torch.softmax(torch.randn(6, vocab), dim=1)
    batch[4] = row
    gens = [None, torch.Generator().manual_seed(99), None, None, torch.Generator().manual_seed(7), None]
    in_batch = sample_from_probs(batch, gens)
    batch2 = torch.cat([row.unsqueeze(0), torch.softmax(torch.randn(2, vocab), dim=1)])
    in_batch2 = sample_from_probs(batch2, [torch.Generator().manual_seed(7), None, None])
    assert int(in_batch[4]) == int(in_batch2[0]) == sample_alone(7)

    # Different seeds give different samples (over many seeds, from a 1000-token distribution).
    draws = {sample_alone(seed) for seed in range(20)}
    assert len(draws) > 5


def test_seeded_row_ignores_default_rng_state():
    # Unseeded neighbours draw from the default RNG; its state must not leak into the seeded row.
    probs = torch.full((3, 10), 0.1)
    torch.manual_seed(5)
    a = sample_from_probs(probs, [None, torch.Generator().manual_seed(3), None])
    torch.manual_seed(6)
    b = sample_from_probs(probs, [None, torch.Generator().manual_seed(3), None])
    assert int(a[1]) == int(b[1])


def test_generator_list_length_checked():
    with pytest.raises(ValueError):
        sample_from_probs(torch.full((2, 3), 1 / 3), [None])
