"""greedy_verify: the accepted prefix, the recovered / bonus token and padding rows."""

from __future__ import annotations

import torch

from workers.verify import verify_block
from workers.verify.greedy import greedy_verify

VOCAB = 10


def _logits_with_argmax(argmax: list[list[int]]) -> torch.Tensor:  # [B, K + 1, V]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(len(argmax), len(argmax[0]), VOCAB, generator=gen)
    logits.scatter_(2, torch.tensor(argmax).unsqueeze(2), 100.0)
    return logits


def test_rejection_at_every_position_and_full_acceptance():
    k = 4
    target = [3, 1, 4, 1, 5]  # target argmax at positions 0..K
    rows = []
    for reject_at in range(k + 1):  # reject_at == K: everything accepted
        draft = list(target[:k])
        if reject_at < k:
            draft[reject_at] = (target[reject_at] + 1) % VOCAB
        rows.append(draft)
    logits = _logits_with_argmax([target] * (k + 1))
    out, n = greedy_verify(torch.tensor(rows), torch.full((k + 1,), k), logits)

    assert n.tolist() == list(range(k + 1))
    for reject_at in range(k + 1):
        emitted = out[reject_at, : reject_at + 1].tolist()
        # The accepted drafts followed by the target's choice: the correction, or the bonus token at position K.
        assert emitted == target[: reject_at + 1]
        assert out[reject_at, reject_at + 1 :].tolist() == [-1] * (k - reject_at)


def test_mismatch_after_rejection_does_not_count():
    # Position 1 mismatches; positions 2 and 3 match again but must not be accepted.
    logits = _logits_with_argmax([[2, 2, 2, 2]])
    out, n = greedy_verify(torch.tensor([[2, 7, 2]]), torch.tensor([3]), logits)
    assert n.tolist() == [1]
    assert out.tolist() == [[2, 2, -1, -1]]


def test_padding_rows():
    k = 3
    target = [[6, 6, 6, 6], [1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 0, 9]]
    logits = _logits_with_argmax(target)
    draft = torch.tensor(
        [
            [-1, -1, -1],  # num_draft = 0: just the target's token at position 0
            [1, 2, 3],  # num_draft = 2: third token matches but is padding; bonus from position 2
            [5, 0, 0],  # num_draft = 1, accepted: bonus from position 1
            [0, 0, 0],  # num_draft = 3, all accepted: bonus from position 3
        ]
    )
    out, n = greedy_verify(draft, torch.tensor([0, 2, 1, 3]), logits)
    assert n.tolist() == [0, 2, 1, 3]
    assert out.tolist() == [[6, -1, -1, -1], [1, 2, 3, -1], [5, 6, -1, -1], [0, 0, 0, 9]]


def test_zero_draft_width():
    logits = _logits_with_argmax([[4], [2]])
    out, n = greedy_verify(torch.empty(2, 0, dtype=torch.long), torch.zeros(2, dtype=torch.long), logits)
    assert n.tolist() == [0, 0]
    assert out.tolist() == [[4], [2]]


def test_verify_block_all_greedy_matches_greedy_verify():
    gen = torch.Generator().manual_seed(3)
    b, k = 16, 3
    logits = torch.randn(b, k + 1, VOCAB, generator=gen)
    # Drafts equal to the argmax with some corruption, so acceptance lengths vary.
    draft = logits[:, :k].argmax(dim=2)
    corrupt = torch.rand(b, k, generator=gen) < 0.3
    draft = torch.where(corrupt, (draft + 1) % VOCAB, draft)
    num_draft = torch.randint(0, k + 1, (b,), generator=gen)
    result = verify_block(
        draft, num_draft, logits, None, torch.zeros(b), torch.zeros(b, dtype=torch.long), torch.ones(b)
    )
    out, n = greedy_verify(draft, num_draft, logits)
    assert torch.equal(result.output_tokens, out)
    assert torch.equal(result.num_accepted, n)
    assert bool((n <= num_draft).all())
