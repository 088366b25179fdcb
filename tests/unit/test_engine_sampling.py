"""Sampling through `SpecEngine`: seeded reproducibility, and that speculative sampling keeps the target's
distribution end to end (drafter, engine, verifier, KV cache rollback together).

The distribution test runs N short requests (prompt + 4 tokens, k = 3 capped to 2 by the engine) with different
seeds as the rows of large batches, drafting with a random tiny model (mostly rejected, so the residual, bonus and
fallback paths all run). Token 1 comes from the prefill; token 2 is the first token of a verification step
(accepted draft or recovered token); token 3 is an accepted second draft, a recovered token, a bonus token or the
next step's sample. Their marginals are computed exactly from transformers' model (every continuation of the prompt
scored, filters applied by a plain reference implementation here) and checked with a chi-square goodness-of-fit
test at level 1e-3. The seeds are fixed, so the test is deterministic. Negative controls run through the same
test and must fail it: samples drawn at the wrong temperature, and a drafter that misreports its distribution.
"""

from __future__ import annotations

import pytest
import torch

from tests.stats import chi_square_pvalue

from workers.drafters.base import DraftProposal
from workers.drafters.model import ModelDrafter
from workers.engine.draft_client import InProcessDraftClient
from workers.engine.engine import SpecEngine
from workers.engine.sequence import Request
from workers.models.loader import load_model
from workers.params import SamplingParams

pytestmark = pytest.mark.usefixtures("torch_single_thread")

ALPHA = 1e-3
N = 6000  # requests per distribution check
BATCH = 128
MAX_MODEL_LEN = 32
PROMPT = "The quick brown fox"
SETTINGS = {"plain": SamplingParams(temperature=1.0), "topk_topp": SamplingParams(temperature=1.0, top_k=20, top_p=0.9)}
# Generated tokens whose exact marginal is checked: enumerating the contexts of token 3 is cheap only when top-k
# keeps the support small (20 x 20), not for the full 384-token vocabulary (384 x 384 forwards).
CHECKED = {"plain": 2, "topk_topp": 3}


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def target(tiny_llama):
    return load_model(str(tiny_llama), dtype="fp32")


@pytest.fixture(scope="module")
def draft(tiny_draft):
    return load_model(str(tiny_draft), dtype="fp32")


@pytest.fixture(scope="module")
def prompt(target) -> list[int]:
    return target.tokenizer.encode(PROMPT)


@pytest.fixture(scope="module")
def hf_target(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def _engine(target, drafter=None, max_batch: int = BATCH) -> SpecEngine:
    client = InProcessDraftClient(drafter) if drafter is not None else None
    return SpecEngine(target, client, max_batch=max_batch, max_model_len=MAX_MODEL_LEN)


def _sample(engine: SpecEngine, prompt: list[int], params: SamplingParams, n: int, max_tokens: int = 4, k: int = 3,
            seed0: int = 0) -> torch.Tensor:
    """[n, max_tokens] generated tokens, request i seeded with seed0 + i."""
    requests = [Request(f"s{i}", list(prompt), max_tokens=max_tokens, num_draft_tokens=k, ignore_eos=True,
                        params=SamplingParams(params.temperature, params.top_k, params.top_p, seed=seed0 + i))
                for i in range(n)]
    seqs = engine.run(requests)
    assert all(len(s.output_ids) == max_tokens for s in seqs)
    return torch.tensor([s.output_ids for s in seqs])


# ----------------------------------------------------------------------------------------------- statistics


def reference_filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[N, V] logits -> probabilities: temperature, then top-k, then top-p over what top-k left, keeping the
    smallest set of most likely tokens whose mass reaches top_p (written independently of workers.verify)."""
    probs = torch.softmax(logits.double() / params.temperature, dim=-1)  # [N, V]
    sorted_p, order = probs.sort(dim=-1, descending=True)
    if params.top_k:
        sorted_p[:, params.top_k :] = 0
    sorted_p = sorted_p / sorted_p.sum(-1, keepdim=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely tokens
    sorted_p = torch.where(before < params.top_p, sorted_p, torch.zeros_like(sorted_p))
    sorted_p = sorted_p / sorted_p.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(1, order, sorted_p)


@torch.no_grad()
def exact_marginals(hf, prompt: list[int], params: SamplingParams, n_tokens: int = 3) -> list[torch.Tensor]:
    """Exact marginal distribution [V] of generated tokens 1..n_tokens, by enumerating every continuation with
    nonzero probability (a handful of batched forwards of the tiny model)."""
    contexts = [list(prompt)]
    weights = torch.ones(1, dtype=torch.float64)
    marginals = []
    for _ in range(n_tokens):
        logits = hf(torch.tensor(contexts)).logits[:, -1]  # [C, V]
        probs = reference_filter(logits, params)  # [C, V]
        joint = weights[:, None] * probs  # [C, V]
        marginals.append(joint.sum(0))
        if len(marginals) == n_tokens:
            break
        nz = joint.nonzero()
        keep = joint[nz[:, 0], nz[:, 1]] > 1e-7  # drop continuations too unlikely to matter at this N
        nz = nz[keep]
        contexts = [contexts[c] + [int(t)] for c, t in nz.tolist()]
        weights = joint[nz[:, 0], nz[:, 1]]
    return marginals


def _pvalues(tokens: torch.Tensor, marginals: list[torch.Tensor]) -> list[float]:
    vocab = marginals[0].shape[0]
    return [chi_square_pvalue(torch.bincount(tokens[:, i], minlength=vocab), m) for i, m in enumerate(marginals)]


def test_reference_filter_matches_the_definition():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    got = reference_filter(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.75))
    # top-3 -> [0.4, 0.3, 0.2] / 0.9; top-p 0.75 keeps 0.444 + 0.333 = 0.778 >= 0.75
    torch.testing.assert_close(got, torch.tensor([[0.0, 4 / 7, 0.0, 3 / 7]], dtype=torch.float64))
    got = reference_filter(logits * 2, SamplingParams(temperature=2.0))  # temperature undoes the scaling
    torch.testing.assert_close(got, torch.tensor([[0.1, 0.4, 0.2, 0.3]], dtype=torch.float64))


@pytest.fixture(scope="module")
def marginals(hf_target, prompt):
    return {name: exact_marginals(hf_target, prompt, params, CHECKED[name]) for name, params in SETTINGS.items()}


# ------------------------------------------------------------------------------------------ distribution tests


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_target_only_sampling_follows_the_target(target, prompt, marginals, setting):
    """The harness itself: target-only sampling (no speculation) passes the test."""
    tokens = _sample(_engine(target), prompt, SETTINGS[setting], N, seed0=10_000)
    pvalues = _pvalues(tokens, marginals[setting])
    assert min(pvalues) > ALPHA, f"target-only {setting}: p-values {pvalues}"


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_speculative_sampling_follows_the_target(target, draft, prompt, marginals, setting):
    drafter = ModelDrafter(draft, max_batch=BATCH, max_model_len=MAX_MODEL_LEN)
    engine = _engine(target, drafter)
    requests_before = len(engine.sequences)
    tokens = _sample(engine, prompt, SETTINGS[setting], N)
    assert len(engine.sequences) == requests_before  # run() releases finished sequences
    pvalues = _pvalues(tokens, marginals[setting])
    assert min(pvalues) > ALPHA, f"speculative {setting}: p-values {pvalues}"


def _speculation_stats(target, draft, prompt, params, n=512):
    drafter = ModelDrafter(draft, max_batch=BATCH, max_model_len=MAX_MODEL_LEN)
    engine = _engine(target, drafter)
    requests = [Request(f"s{i}", list(prompt), max_tokens=4, num_draft_tokens=3, ignore_eos=True,
                        params=SamplingParams(params.temperature, params.top_k, params.top_p, seed=i))
                for i in range(n)]
    seqs = engine.run(requests)
    return engine, seqs


def test_speculation_really_happens(target, draft, prompt):
    """The distribution test is only meaningful if drafts are verified, and both accepted and rejected."""
    engine, seqs = _speculation_stats(target, draft, prompt, SETTINGS["plain"])
    drafted = sum(s.num_draft_tokens for s in seqs)
    accepted = sum(s.num_accepted_tokens for s in seqs)
    assert engine.fallback_steps == 0
    assert all(s.num_drafts >= 1 for s in seqs)
    assert all(s.num_draft_tokens <= 2 * s.num_drafts for s in seqs)  # k = 3 capped to 2 by max_tokens = 4
    assert 0.02 * drafted < accepted < 0.98 * drafted, (accepted, drafted)
    assert any(s.num_accepted_tokens == 2 for s in seqs)  # some full blocks: bonus tokens were sampled


# ------------------------------------------------------------------------------------------ negative controls


def test_negative_control_wrong_temperature_fails(target, prompt, marginals):
    tokens = _sample(_engine(target), prompt, SamplingParams(temperature=0.5), N, seed0=20_000)
    pvalues = _pvalues(tokens, marginals["plain"])
    assert max(pvalues) < ALPHA, f"the test cannot tell temperature 0.5 from 1.0: p-values {pvalues}"


class MisreportingDrafter(ModelDrafter):
    """Samples drafts from its model but claims they came from the uniform distribution: the verifier then
    accepts them far too often and the output drifts towards the draft model."""

    def propose(self, requests):
        out = super().propose(requests)
        return [DraftProposal(p.tokens, None if p.probs is None else torch.full_like(p.probs, 1 / p.probs.shape[1]))
                for p in out]


def test_negative_control_misreported_draft_distribution_fails(target, draft, prompt, marginals):
    engine = _engine(target, MisreportingDrafter(draft, max_batch=BATCH, max_model_len=MAX_MODEL_LEN))
    tokens = _sample(engine, prompt, SETTINGS["plain"], N // 3)  # the bias is gross: a third of N shows it
    pvalues = _pvalues(tokens, marginals["plain"])
    assert pvalues[0] > ALPHA, "token 1 comes from the prefill and is not affected by the drafter"
    assert min(pvalues[1:]) < ALPHA, f"a lossy verifier input went unnoticed: p-values {pvalues}"


# -------------------------------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("drafted", [False, True])
def test_same_seed_same_tokens(target, draft, prompt, drafted):
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95)

    def run(seed0):
        drafter = ModelDrafter(draft, max_batch=8, max_model_len=MAX_MODEL_LEN) if drafted else None
        return _sample(_engine(target, drafter, 8), prompt, params, 16, max_tokens=12, seed0=seed0)

    first, again, other = run(0), run(0), run(100)
    assert torch.equal(first, again)
    assert len({tuple(r) for r in first.tolist()}) > 8, "different seeds in one run should give different samples"
    assert (first != other).any(axis=1).float().mean() > 0.5, "a different seed should change most outputs"


@pytest.mark.parametrize("drafted", [False, True])
def test_seeded_output_does_not_depend_on_the_batch(target, draft, prompt, drafted):
    """A seeded request draws only from its own generators, so its tokens are the same alone or batched with
    other (sampled, greedy, unseeded) requests."""
    params = SamplingParams(temperature=0.8, top_k=40, seed=7)

    def make(mates: int):
        drafter = ModelDrafter(draft, max_batch=8, max_model_len=MAX_MODEL_LEN) if drafted else None
        engine = _engine(target, drafter, 8)
        reqs = [Request("me", list(prompt), max_tokens=14, num_draft_tokens=3, params=params, ignore_eos=True)]
        for i in range(mates):
            mate_params = [SamplingParams(), SamplingParams(temperature=1.3), SamplingParams(temperature=0.7, seed=i)]
            reqs.append(Request(f"m{i}", list(prompt)[: 1 + i % 3] + [i], max_tokens=5 + 3 * i, num_draft_tokens=i % 4,
                                params=mate_params[i % 3], ignore_eos=True))
        return engine.run(reqs)[0].output_ids

    alone = make(0)
    assert make(6) == alone


def test_greedy_rows_in_a_sampled_batch_stay_greedy(target, draft, prompt):
    greedy_ref = _engine(target, None, 1).run(
        [Request("g", list(prompt), max_tokens=12, num_draft_tokens=0, ignore_eos=True)])[0].output_ids
    drafter = ModelDrafter(draft, max_batch=8, max_model_len=MAX_MODEL_LEN)
    reqs = [Request(f"r{i}", list(prompt), max_tokens=12, num_draft_tokens=3, ignore_eos=True,
                    params=SamplingParams() if i % 2 else SamplingParams(temperature=1.0, seed=i)) for i in range(8)]
    seqs = _engine(target, drafter, 8).run(reqs)
    for i, s in enumerate(seqs):
        if i % 2:
            assert s.output_ids == greedy_ref
    assert any(s.output_ids != greedy_ref for i, s in enumerate(seqs) if i % 2 == 0)
