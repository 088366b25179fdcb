"""Statistical test that rejection_verify is lossless, with negative controls that the same test must reject.

Each case runs N = 100k independent sequences as the rows of one batch. The target distribution p_s at stream
position s and the draft distribution q_s are fixed per position and independent of the prefix, so the emitted
stream must be i.i.d. across rows with token s ~ p_s. Rows whose first verify step emits a single token run a second
step from position 1 (fresh drafts), exactly as the engine would, so the first two emitted tokens exist for every
row and their joint must be p_0 x p_1. Both are checked with a chi-square goodness-of-fit test at level 1e-3; the
seeds are fixed, so the test is deterministic. The negative controls (accept every draft token; sample the
correction from p instead of the residual) run through the same test and must fail it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from tests.stats import chi_square_pvalue

from workers.verify import verify_block
from workers.verify.greedy import greedy_verify
from workers.verify.rejection import rejection_verify
from workers.verify.sampling import filter_logits_to_probs

N = 100_000
VOCAB = 12
ALPHA = 1e-3
EMITTED = 2  # tokens checked per sequence: the marginal of the first and the joint of the first two


# ----------------------------------------------------------------------------------------------------- statistics


def marginal_pvalue(tokens: torch.Tensor, p: torch.Tensor) -> float:  # tokens [N], p [V]
    return chi_square_pvalue(torch.bincount(tokens, minlength=VOCAB), p)


def joint_pvalue(first: torch.Tensor, second: torch.Tensor, p0: torch.Tensor, p1: torch.Tensor) -> float:
    counts = torch.bincount(first * VOCAB + second, minlength=VOCAB * VOCAB)  # [V * V]
    return chi_square_pvalue(counts, torch.outer(p0.double(), p1.double()).flatten())


# ----------------------------------------------------------------------------------------------------- scenarios


@dataclass
class Case:
    target: torch.Tensor  # [S, V] filtered target distribution p_s per stream position
    draft: torch.Tensor  # [S, V] distribution the draft tokens are drawn from
    point_mass: bool  # verify with draft_probs=None (the drafter claims a point mass on its token)

    def acceptance_rate(self, s: int) -> float:
        """Probability that the draft token at position s is accepted."""
        p, q = self.target[s].double(), self.draft[s].double()
        if self.point_mass:
            return float((q * p).sum())  # accept a proposed x with probability p(x)
        return float(torch.minimum(p, q).sum())


SETTINGS = {  # name: (temperature, top_k, top_p), applied to both the draft and the target logits
    "plain": (1.0, 0, 1.0),
    "cold_topk": (0.6, 5, 1.0),
    "hot_topp": (1.5, 0, 0.7),
    "topk_topp": (0.8, 6, 0.9),
}
PAIRS = ("same", "different", "draft_zeros", "point_mass")


def make_case(pair: str, setting: str, k: int) -> Case:
    positions = EMITTED + k  # a second step can start at position 1 and look K + 1 ahead
    gen = torch.Generator().manual_seed(1234)
    target_logits = torch.randn(positions, VOCAB, generator=gen) * 1.5
    if pair == "same":
        draft_logits = target_logits.clone()
    elif pair in ("different", "point_mass"):
        draft_logits = torch.randn(positions, VOCAB, generator=gen) * 2.0
    elif pair == "draft_zeros":
        # Close to the target but impossible on the target's two favourite tokens: q = 0 where p is largest.
        draft_logits = target_logits + 0.3 * torch.randn(positions, VOCAB, generator=gen)
        draft_logits.scatter_(1, target_logits.topk(2, dim=1).indices, float("-inf"))
    else:
        raise ValueError(pair)

    temperature, top_k, top_p = SETTINGS[setting]

    def filtered(logits: torch.Tensor) -> torch.Tensor:
        return filter_logits_to_probs(
            logits,
            torch.full((positions,), temperature),
            torch.full((positions,), top_k, dtype=torch.long),
            torch.full((positions,), top_p),
        )

    if pair == "point_mass":
        # An n-gram-like drafter: proposes tokens by its own rule (here: unfiltered draft softmax, so it also
        # proposes tokens the filtered target rules out) and reports no distribution.
        return Case(filtered(target_logits), torch.softmax(draft_logits, dim=1), point_mass=True)
    return Case(filtered(target_logits), filtered(draft_logits), point_mass=False)


def run_sequences(case: Case, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Emit the first EMITTED tokens of N sequences. Returns (tokens [N, EMITTED], num_accepted of step 1 [N])."""
    torch.manual_seed(seed)
    emitted = torch.full((N, EMITTED), -1, dtype=torch.long)
    count = torch.zeros(N, dtype=torch.long)
    rows = torch.arange(N)
    first_num_accepted = None
    while rows.numel() > 0:
        r = rows.numel()
        pos = count[rows].unsqueeze(1) + torch.arange(k + 1)  # [R, K + 1] stream positions of this step
        # Fresh draft tokens for every stream position (1-D multinomials are fast), then each row's K of them.
        per_position = torch.stack([torch.multinomial(q, r, replacement=True) for q in case.draft], dim=1)  # [R, S]
        draft = per_position.gather(1, pos[:, :k])  # [R, K]
        out, num_accepted = rejection_verify(
            draft,
            torch.full((r,), k, dtype=torch.long),
            None if case.point_mass else case.draft[pos[:, :k]],  # [R, K, V]
            case.target[pos],  # [R, K + 1, V]
            None,
        )
        if first_num_accepted is None:
            first_num_accepted = num_accepted
        for j in range(k + 1):
            slot = count[rows] + j
            take = (j <= num_accepted) & (slot < EMITTED)
            emitted[rows[take], slot[take]] = out[take, j]
        count[rows] += num_accepted + 1
        rows = rows[count[rows] < EMITTED]
    return emitted, first_num_accepted


# ----------------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("pair", PAIRS)
def test_emitted_tokens_follow_target(pair: str, setting: str, k: int):
    case = make_case(pair, setting, k)
    seed = 100 * PAIRS.index(pair) + 10 * list(SETTINGS).index(setting) + k  # fixed, distinct per case
    emitted, num_accepted = run_sequences(case, k, seed=seed)
    assert bool((emitted >= 0).all())

    p_first = marginal_pvalue(emitted[:, 0], case.target[0])
    assert p_first > ALPHA, f"first token does not follow the target (p={p_first:.2e})"
    p_joint = joint_pvalue(emitted[:, 0], emitted[:, 1], case.target[0], case.target[1])
    assert p_joint > ALPHA, f"first two tokens do not follow the target (p={p_joint:.2e})"

    # P(num_accepted >= i) = prod_{s < i} beta_s, beta_s = sum_x min(p_s(x), q_s(x)); binomial tolerance.
    reach = 1.0
    for i in range(1, k + 1):
        reach *= case.acceptance_rate(i - 1)
        empirical = float((num_accepted >= i).double().mean())
        tolerance = 5 * (max(reach * (1 - reach), 0.0) / N) ** 0.5 + 1e-4
        assert abs(empirical - reach) <= tolerance, f"P(accepted >= {i}) {empirical:.4f} vs {reach:.4f}"
    assert bool((num_accepted <= k).all())


@pytest.fixture(scope="module")
def different_case_draws():
    """One verify step of K=2 on the 'different' pair, with the drafts and uniforms a faulty sampler would use."""
    case = make_case("different", "plain", 2)
    gen = torch.Generator().manual_seed(7)
    draft = torch.stack([torch.multinomial(case.draft[s], N, replacement=True, generator=gen) for s in (0, 1)], 1)
    uniform = torch.rand(N, generator=gen)
    recovered_from_p = torch.multinomial(case.target[0], N, replacement=True, generator=gen)
    return case, draft, uniform, recovered_from_p


def test_negative_control_always_accept_fails(different_case_draws):
    case, draft, _, _ = different_case_draws
    # Emitting the draft tokens unverified follows q, not p: the marginal and the joint tests must reject it.
    assert marginal_pvalue(draft[:, 0], case.target[0]) < ALPHA
    assert joint_pvalue(draft[:, 0], draft[:, 1], case.target[0], case.target[1]) < ALPHA


def test_negative_control_correction_from_target_fails(different_case_draws):
    case, draft, uniform, recovered_from_p = different_case_draws
    # The classic bug: after a rejection, sample from p instead of norm(max(p - q, 0)).
    x = draft[:, 0]
    accept = uniform * case.draft[0][x] < case.target[0][x]
    first = torch.where(accept, x, recovered_from_p)
    assert marginal_pvalue(first, case.target[0]) < ALPHA


def test_negative_control_is_not_a_weak_pair():
    # The controls above must fail because the pair differs, not by chance: q and p are far apart in TV distance.
    case = make_case("different", "plain", 2)
    assert 1 - case.acceptance_rate(0) > 0.3


# ----------------------------------------------------------------------------------------------------- edge cases


def test_point_mass_none_equals_one_hot_draft_probs():
    gen = torch.Generator().manual_seed(11)
    b, k = 2000, 3
    target = torch.softmax(torch.randn(b, k + 1, VOCAB, generator=gen), dim=2)
    draft = torch.randint(0, VOCAB, (b, k), generator=gen)
    num_draft = torch.randint(0, k + 1, (b,), generator=gen)
    one_hot = torch.nn.functional.one_hot(draft, VOCAB).float()  # [B, K, V]
    torch.manual_seed(3)
    out_none, n_none = rejection_verify(draft, num_draft, None, target, None)
    torch.manual_seed(3)
    out_hot, n_hot = rejection_verify(draft, num_draft, one_hot, target, None)
    assert torch.equal(n_none, n_hot)
    assert torch.equal(out_none, out_hot)
    assert 0 < float(n_none.float().mean()) < k  # both acceptances and rejections happened


def test_mixed_one_hot_and_dense_draft_rows():
    # Half the rows carry a one-hot q (a greedy drafter), half a dense q, in one batch; both halves stay lossless.
    case = make_case("different", "plain", 1)
    torch.manual_seed(21)
    half = N // 2
    draft = torch.multinomial(case.draft[0], N, replacement=True).view(N, 1)
    draft_probs = case.draft[0].expand(N, 1, VOCAB).clone()
    draft_probs[:half] = torch.nn.functional.one_hot(draft[:half], VOCAB).float()
    target = case.target[:2].expand(N, 2, VOCAB)
    out, _ = rejection_verify(draft, torch.ones(N, dtype=torch.long), draft_probs, target, None)
    assert marginal_pvalue(out[:half, 0], case.target[0]) > ALPHA
    assert marginal_pvalue(out[half:, 0], case.target[0]) > ALPHA


def test_zero_residual_falls_back_to_target():
    # The draft token has p = 0 and q tiny, so it is always rejected, and max(p - q, 0) has (numerically) no mass.
    p = torch.tensor([0.0, 0.5, 0.3, 0.2])
    q = torch.tensor([1e-8, 0.5, 0.3, 0.2 - 1e-8])
    n = 50_000
    torch.manual_seed(4)
    out, num_accepted = rejection_verify(
        torch.zeros(n, 1, dtype=torch.long),
        torch.ones(n, dtype=torch.long),
        q.expand(n, 1, 4),
        p.expand(n, 2, 4),
        None,
    )
    assert int(num_accepted.sum()) == 0
    freq = torch.bincount(out[:, 0], minlength=4).double() / n
    torch.testing.assert_close(freq, p.double(), atol=0.01, rtol=0)


def test_padding_and_empty_rows():
    b, k = 6, 3
    # A target that is certain of token 9 at every position; drafts of 9 are always accepted.
    target = torch.nn.functional.one_hot(torch.tensor(9), VOCAB).float().expand(b, k + 1, VOCAB)
    draft = torch.tensor([[9, 9, 9]] * b)
    draft[1, 2] = -1  # padding past num_draft
    num_draft = torch.tensor([0, 2, 3, 1, 0, 3])
    out, n = rejection_verify(draft, num_draft, None, target, None)
    assert n.tolist() == num_draft.tolist()
    for row in range(b):
        m = int(num_draft[row])
        assert out[row, : m + 1].tolist() == [9] * (m + 1)  # accepted drafts then the bonus token
        assert out[row, m + 1 :].tolist() == [-1] * (k - m)

    empty = torch.empty(2, 0, dtype=torch.long)
    out, n = rejection_verify(empty, torch.zeros(2, dtype=torch.long), None, target[:2, :1], None)
    assert n.tolist() == [0, 0] and out.tolist() == [[9], [9]]


def test_seeded_row_reproducible_regardless_of_batch():
    gen = torch.Generator().manual_seed(6)
    vocab = 50
    target_row = torch.softmax(torch.randn(3, vocab, generator=gen), dim=1)  # [num_draft + 1, V]
    draft_row = torch.softmax(torch.randn(2, vocab, generator=gen), dim=1)  # [num_draft, V]
    tokens_row = torch.tensor([int(draft_row[0].argmax()), int(draft_row[1].argmax())])

    def alone(seed: int) -> list[int]:
        out, n = rejection_verify(tokens_row.view(1, 2), torch.tensor([2]), draft_row.unsqueeze(0),
                                  target_row.unsqueeze(0), [torch.Generator().manual_seed(seed)])
        return out[0, : int(n[0]) + 1].tolist()

    # The same row at position 2 of a batch padded to K=4 with other (seeded and unseeded) rows around it, under
    # two different states of the default RNG.
    b, k = 4, 4
    target = torch.softmax(torch.randn(b, k + 1, vocab, generator=gen), dim=2)
    draft_probs = torch.softmax(torch.randn(b, k, vocab, generator=gen), dim=2)
    draft = torch.randint(0, vocab, (b, k), generator=gen)
    target[2, :3] = target_row
    draft_probs[2, :2] = draft_row
    draft[2, :2] = tokens_row
    for default_seed in (0, 1):
        torch.manual_seed(default_seed)
        gens = [torch.Generator().manual_seed(1), None, torch.Generator().manual_seed(42), None]
        out, n = rejection_verify(draft, torch.tensor([4, 3, 2, 4]), draft_probs, target, gens)
        assert out[2, : int(n[2]) + 1].tolist() == alone(42)

    assert len({tuple(alone(seed)) for seed in range(10)}) > 1  # the seed does matter


def test_verify_block_mixed_batch_matches_parts():
    gen = torch.Generator().manual_seed(8)
    b, k, vocab = 6, 3, 40
    logits = torch.randn(b, k + 1, vocab, generator=gen) * 2
    temperature = torch.tensor([0.0, 0.7, 0.0, 1.2, 1.0, 0.0])
    top_k = torch.tensor([0, 10, 5, 0, 0, 0])
    top_p = torch.tensor([1.0, 1.0, 0.5, 0.9, 1.0, 1.0])
    draft = logits[:, :k].argmax(dim=2)  # mostly accepted by greedy rows, often by sampled ones
    draft[0, 1] = (draft[0, 1] + 1) % vocab
    num_draft = torch.tensor([3, 3, 2, 3, 0, 1])
    draft_probs = torch.nn.functional.one_hot(draft, vocab).float()

    def seeded() -> list[torch.Generator | None]:
        return [None, torch.Generator().manual_seed(1), None, torch.Generator().manual_seed(2),
                torch.Generator().manual_seed(3), None]

    result = verify_block(draft, num_draft, logits, draft_probs, temperature, top_k, top_p, seeded())

    greedy_rows = torch.tensor([0, 2, 5])
    out, n = greedy_verify(draft[greedy_rows], num_draft[greedy_rows], logits[greedy_rows])
    assert torch.equal(result.output_tokens[greedy_rows], out)
    assert torch.equal(result.num_accepted[greedy_rows], n)
    assert result.num_accepted[0] == 1

    sampled_rows = torch.tensor([1, 3, 4])
    gens = seeded()
    probs = filter_logits_to_probs(
        logits[sampled_rows].reshape(-1, vocab),
        temperature[sampled_rows].repeat_interleave(k + 1),
        top_k[sampled_rows].repeat_interleave(k + 1),
        top_p[sampled_rows].repeat_interleave(k + 1),
    ).view(3, k + 1, vocab)
    out, n = rejection_verify(draft[sampled_rows], num_draft[sampled_rows], draft_probs[sampled_rows], probs,
                              [gens[i] for i in sampled_rows.tolist()])
    assert torch.equal(result.output_tokens[sampled_rows], out)
    assert torch.equal(result.num_accepted[sampled_rows], n)
