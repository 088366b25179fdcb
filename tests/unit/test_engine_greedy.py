"""Greedy speculative decoding through `SpecEngine` is token-identical to target-only decoding.

The reference is the same engine with no drafter (k = 0: prefill, then one target token per step), itself checked
against a plain argmax loop over transformers' model. Every drafter must reproduce it exactly, whatever it
proposes: the target itself (everything accepted, so tau == k + 1 exactly), a random model (mostly rejected),
prompt lookup, and an oracle that proposes the reference continuation corrupted at position j (so every full step
accepts exactly j). Then the stop conditions (EOS, stop strings, max_tokens, abort, context limit) and request
validation.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from workers.drafters.base import DraftProposal, DraftRequest, Drafter
from workers.drafters.model import ModelDrafter
from workers.drafters.ngram import NgramDrafter
from workers.engine.draft_client import InProcessDraftClient
from workers.engine.engine import SpecEngine
from workers.engine.sequence import Request, Sequence
from workers.models.loader import load_model

PROMPTS = [
    "The quick brown fox",
    "def add(a, b):",
    "Hello world! How are you",
    "1 + 1 = 2, 2 + 2 =",
    "Speculative decoding drafts tokens",
    "a",
    "The lazy dog jumps over the quick brown fox. The lazy",
    "3 + 3 = 6.",
]
REF_LEN = 40  # reference continuation length; every test asks for at most this many tokens
MAX_TOKENS = (5, 17, 40)
MAX_MODEL_LEN = 256

pytestmark = pytest.mark.usefixtures("torch_single_thread")


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def target(tiny_llama):
    return load_model(str(tiny_llama), dtype="fp32")


@pytest.fixture(scope="module")
def target_copy(tiny_llama):
    """A second load of the target, to draft with: a drafter that agrees with the target on every token."""
    return load_model(str(tiny_llama), dtype="fp32")


@pytest.fixture(scope="module")
def random_draft(tiny_draft):
    return load_model(str(tiny_draft), dtype="fp32")


@pytest.fixture(scope="module")
def prompt_ids(target) -> list[list[int]]:
    return [target.tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(target, prompt_ids) -> list[list[int]]:
    """Target-only greedy continuation of each prompt (REF_LEN tokens, EOS ignored)."""
    engine = SpecEngine(target, max_batch=8, max_model_len=MAX_MODEL_LEN)
    seqs = engine.run([_request(i, ids, REF_LEN, k=0) for i, ids in enumerate(prompt_ids)])
    out = [s.output_ids for s in seqs]
    assert all(len(o) == REF_LEN for o in out)
    return out


def _request(i: int, ids: list[int], max_tokens: int, k: int, **kw) -> Request:
    return Request(seq_id=f"r{i}", prompt_ids=list(ids), max_tokens=max_tokens, num_draft_tokens=k,
                   ignore_eos=kw.pop("ignore_eos", True), **kw)


def _engine(target, drafter: Drafter | None, max_batch: int, **kw) -> SpecEngine:
    client = InProcessDraftClient(drafter) if drafter is not None else None
    return SpecEngine(target, client, max_batch=max_batch, max_model_len=kw.pop("max_model_len", MAX_MODEL_LEN), **kw)


def run_checked(engine: SpecEngine, requests: list[Request], on_step=None) -> list[Sequence]:
    """Run to completion, checking the event stream: per sequence, the concatenated new tokens equal its output,
    exactly one final event carries the finish reason, and no event follows it."""
    seqs = [engine.add_request(r) for r in requests]
    streamed: dict[str, list[int]] = {s.seq_id: [] for s in seqs}
    finished: dict[str, str] = {}
    steps = 0
    while engine.has_work:
        before = {s.seq_id: (s.num_draft_tokens, s.num_accepted_tokens) for s in seqs}
        events = engine.step()
        steps += 1
        assert steps < 10_000, "engine does not terminate"
        for ev in events:
            assert ev.seq_id not in finished, f"event after the final one for {ev.seq_id}"
            streamed[ev.seq_id] += ev.new_token_ids
            if ev.finished:
                finished[ev.seq_id] = ev.finish_reason
        if on_step is not None:
            on_step(seqs, before)
    for s in seqs:
        assert streamed[s.seq_id] == s.output_ids
        assert finished[s.seq_id] == s.finish_reason.value
        assert s.slot == -1
    assert engine.runner.num_free_slots == engine.runner.cache.num_slots
    assert not engine.running and not engine.waiting
    return seqs


def _max_tokens(i: int) -> int:
    return MAX_TOKENS[i % len(MAX_TOKENS)]


def _requests(prompt_ids, k: int | list[int], max_tokens=_max_tokens) -> list[Request]:
    ks = k if isinstance(k, list) else [k] * len(prompt_ids)
    return [_request(i, ids, max_tokens(i), ks[i]) for i, ids in enumerate(prompt_ids)]


def _assert_matches_reference(seqs: list[Sequence], reference: list[list[int]]):
    for i, s in enumerate(seqs):
        n = s.request.max_tokens
        assert s.output_ids == reference[i][:n], f"prompt {i} (k={s.request.num_draft_tokens}) diverged"
        assert s.finish_reason.value == "length"


# ----------------------------------------------------------------------------------------- the reference itself


def test_reference_matches_transformers_argmax_loop(tiny_llama, prompt_ids, reference):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    for i in (0, 3, 5):
        ids = list(prompt_ids[i])
        with torch.no_grad():
            for _ in range(REF_LEN):
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
        assert ids[len(prompt_ids[i]):] == reference[i]


@pytest.mark.parametrize("max_batch", [1, 3, 8])
def test_target_only_is_independent_of_batching(target, prompt_ids, reference, max_batch):
    seqs = run_checked(_engine(target, None, max_batch), _requests(prompt_ids, 4))  # k ignored without drafter
    _assert_matches_reference(seqs, reference)
    assert all(s.num_drafts == 0 and s.tau == 1.0 for s in seqs)


# ---------------------------------------------------------------------------------------------------- drafters


@pytest.mark.parametrize("max_batch", [1, 8])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_draft_equal_to_target_accepts_every_block(target, target_copy, prompt_ids, reference, k, max_batch):
    """max_tokens = 1 + (k + 1) * m: the prefill emits one token and m steps each verify a full block of k."""
    ms = [2, 5]
    budget = [1 + (k + 1) * ms[i % 2] for i in range(len(prompt_ids))]
    drafter = ModelDrafter(target_copy, max_batch=max_batch, max_model_len=MAX_MODEL_LEN)
    seqs = run_checked(_engine(target, drafter, max_batch), _requests(prompt_ids, k, lambda i: budget[i]))
    _assert_matches_reference(seqs, reference)
    for i, s in enumerate(seqs):
        m = ms[i % 2]
        assert len(s.output_ids) == budget[i]
        assert s.num_drafts == m
        assert s.num_draft_tokens == s.num_accepted_tokens == k * m
        assert s.tau == k + 1
        assert s.accepted_per_pos == [m] * k
        assert s.num_steps == m + 1  # the prefill and m verification steps
    assert not drafter.states, "finished sequences must release their draft state"
    assert drafter.cache.num_free == max_batch


@pytest.mark.parametrize("max_batch", [1, 8])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_random_draft_gives_identical_output(target, random_draft, prompt_ids, reference, k, max_batch):
    drafter = ModelDrafter(random_draft, max_batch=max_batch, max_model_len=MAX_MODEL_LEN)
    engine = _engine(target, drafter, max_batch)
    seqs = run_checked(engine, _requests(prompt_ids, k))
    _assert_matches_reference(seqs, reference)
    drafted = sum(s.num_draft_tokens for s in seqs)
    accepted = sum(s.num_accepted_tokens for s in seqs)
    assert drafted > 0 and engine.fallback_steps == 0
    assert accepted < drafted, "a random draft should be rejected somewhere: the rejection path must run"
    for s in seqs:
        assert 1.0 <= s.tau <= k + 1


@pytest.mark.parametrize("max_batch", [1, 8])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_ngram_draft_gives_identical_output(target, prompt_ids, reference, k, max_batch):
    engine = _engine(target, NgramDrafter(), max_batch)
    seqs = run_checked(engine, _requests(prompt_ids, k))
    _assert_matches_reference(seqs, reference)
    assert sum(s.num_draft_tokens for s in seqs) > 0


class OracleDrafter(Drafter):
    """Knows the target-only output; proposes its next k tokens with position `corrupt` replaced by a wrong token
    (corrupt >= k: no corruption). Also checks that the context it is asked to continue is the reference."""

    def __init__(self, prompts: dict[str, list[int]], outputs: dict[str, list[int]], corrupt: int, vocab: int):
        self.prompts, self.outputs, self.corrupt, self.vocab = prompts, outputs, corrupt, vocab
        self.proposed: list[tuple[str, int]] = []

    def propose(self, requests: list[DraftRequest]) -> list[DraftProposal]:
        out = []
        for r in requests:
            prompt, ref = self.prompts[r.seq_id], self.outputs[r.seq_id]
            pos = len(r.token_ids) - len(prompt)
            assert r.token_ids == prompt + ref[:pos], "the engine asked to continue a context it never committed"
            tokens = list(ref[pos : pos + r.k])
            if self.corrupt < len(tokens):
                tokens[self.corrupt] = (tokens[self.corrupt] + 1) % self.vocab
            self.proposed.append((r.seq_id, len(tokens)))
            out.append(DraftProposal(tokens))
        return out


# every (k, j) with all 8 prompts in one batch; batch 1 (sequential) for k = 3 only, to keep the suite fast
FORCED = [(k, j, 8) for k in (1, 3, 5) for j in range(k + 1)] + [(3, j, 1) for j in range(4)]


@pytest.mark.parametrize("k,j,max_batch", FORCED)
def test_forced_rejection_accepts_exactly_j(target, prompt_ids, reference, k, j, max_batch):
    requests = _requests(prompt_ids, k)
    drafter = OracleDrafter({r.seq_id: r.prompt_ids for r in requests},
                            {r.seq_id: reference[i] for i, r in enumerate(requests)}, j, target.vocab_size)
    drafted_per_step: dict[str, list[int]] = {r.seq_id: [] for r in requests}

    def check_step(seqs, before):
        for s in seqs:
            drafted = s.num_draft_tokens - before[s.seq_id][0]
            accepted = s.num_accepted_tokens - before[s.seq_id][1]
            assert accepted == min(j, drafted), f"{s.seq_id}: drafted {drafted}, accepted {accepted}, j={j}"
            if drafted:
                drafted_per_step[s.seq_id].append(drafted)

    seqs = run_checked(_engine(target, drafter, max_batch), requests, on_step=check_step)
    _assert_matches_reference(seqs, reference)
    assert any(n == k for steps in drafted_per_step.values() for n in steps), "no step verified a full block"
    assert sum(n for _, n in drafter.proposed) == sum(s.num_draft_tokens for s in seqs)
    for s in seqs:
        steps = drafted_per_step[s.seq_id]
        assert s.num_drafts == len(steps)
        expected = [sum(1 for n in steps if min(j, n) > p) for p in range(max(steps, default=0))]
        assert s.accepted_per_pos == expected


@pytest.mark.parametrize("max_batch", [1, 8])
def test_mixed_k_in_one_batch(target, target_copy, random_draft, prompt_ids, reference, max_batch):
    ks = [0, 1, 5, 0, 3, 2, 4, 0]
    for draft in (target_copy, random_draft):
        drafter = ModelDrafter(draft, max_batch=max_batch, max_model_len=MAX_MODEL_LEN)
        seqs = run_checked(_engine(target, drafter, max_batch), _requests(prompt_ids, ks))
        _assert_matches_reference(seqs, reference)
        for s, k in zip(seqs, ks):
            if k == 0:
                assert s.num_drafts == 0 and s.num_draft_tokens == 0
            else:
                assert s.num_drafts > 0
                assert s.num_draft_tokens <= k * s.num_drafts
                assert len(s.accepted_per_pos) <= k


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma3"])
def test_other_families_identical_output(tiny_models, random_draft, prompt_ids, family):
    """Every family through the engine: rollback under gemma3's sliding window (8) included, since sequences run
    to 40 tokens past prompts of up to 13. The random llama (same tokenizer) drafts for all of them and is
    always rejected; a second load of the family itself is always accepted."""
    from transformers import AutoModelForCausalLM

    fam = load_model(str(tiny_models[family]), dtype="fp32")
    ref = [s.output_ids for s in _engine(fam, None, 8).run(_requests(prompt_ids, 0, lambda i: REF_LEN))]
    hf = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32).eval()
    ids = list(prompt_ids[6])
    with torch.no_grad():
        for _ in range(REF_LEN):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    assert ids[len(prompt_ids[6]):] == ref[6]
    same = load_model(str(tiny_models[family]), dtype="fp32")
    for k, draft in ((2, random_draft), (5, random_draft), (3, same)):
        drafter = ModelDrafter(draft, max_batch=8, max_model_len=MAX_MODEL_LEN)
        seqs = run_checked(_engine(fam, drafter, 8), _requests(prompt_ids, k))
        _assert_matches_reference(seqs, ref)
        drafted, accepted = sum(s.num_draft_tokens for s in seqs), sum(s.num_accepted_tokens for s in seqs)
        assert drafted > 0
        if draft is same:  # everything accepted: whole blocks are written and kept past the window
            assert accepted == drafted


def test_drafter_that_proposes_too_many_tokens_is_cut_to_k(target, prompt_ids, reference):
    class Greedy(OracleDrafter):
        def propose(self, requests):
            return super().propose([DraftRequest(r.seq_id, r.token_ids, r.k + 3) for r in requests])

    requests = _requests(prompt_ids, 2)
    drafter = Greedy({r.seq_id: r.prompt_ids for r in requests},
                     {r.seq_id: reference[i] + [0] * 8 for i, r in enumerate(requests)}, 99, target.vocab_size)
    seqs = run_checked(_engine(target, drafter, 8), requests)
    _assert_matches_reference(seqs, reference)
    for s in seqs:
        assert s.num_draft_tokens <= 2 * s.num_drafts


def test_draft_near_the_context_limit(target, target_copy, prompt_ids, reference):
    """prompt + max_tokens == max_model_len: the last steps must shrink k so nothing runs past the context."""
    i = 6
    limit = len(prompt_ids[i]) + 20
    drafter = ModelDrafter(target_copy, max_batch=1, max_model_len=limit)
    engine = _engine(target, drafter, 1, max_model_len=limit, max_draft_tokens=5)
    seqs = run_checked(engine, [_request(i, prompt_ids[i], 20, k=5)])
    assert seqs[0].output_ids == reference[i][:20]
    assert seqs[0].finish_reason.value == "length"


# ------------------------------------------------------------------------------------------------ stop conditions


def test_max_tokens_finishes_with_length(target, target_copy, prompt_ids, reference):
    drafter = ModelDrafter(target_copy, max_batch=8, max_model_len=MAX_MODEL_LEN)
    seqs = run_checked(_engine(target, drafter, 8),
                       [_request(i, ids, 1 + i, k=3) for i, ids in enumerate(prompt_ids)])
    for i, s in enumerate(seqs):
        assert len(s.output_ids) == 1 + i
        assert s.output_ids == reference[i][: 1 + i]
        assert s.finish_reason.value == "length"


def test_natural_eos_stops(target, target_copy, prompt_ids, reference):
    eos = target.eos_token_ids
    with_eos = [i for i, ref in enumerate(reference) if any(t in eos for t in ref[:REF_LEN])]
    assert with_eos, "expected the tiny model to emit EOS for some prompt; pick other prompts"
    for k, drafter in ((0, None), (3, ModelDrafter(target_copy, max_batch=8, max_model_len=MAX_MODEL_LEN))):
        seqs = run_checked(_engine(target, drafter, 8),
                           [_request(i, prompt_ids[i], REF_LEN, k=k, ignore_eos=False) for i in with_eos])
        for i, s in zip(with_eos, seqs):
            cut = next(n for n, t in enumerate(reference[i]) if t in eos) + 1
            assert s.output_ids == reference[i][:cut]
            assert s.finish_reason.value == "stop"
        # the same requests with ignore_eos run to max_tokens
        seqs = run_checked(_engine(target, drafter, 8),
                           [_request(i, prompt_ids[i], REF_LEN, k=k, ignore_eos=True) for i in with_eos])
        for i, s in zip(with_eos, seqs):
            assert s.output_ids == reference[i] and s.finish_reason.value == "length"


@pytest.mark.parametrize("k", [0, 5])
@pytest.mark.parametrize("where", ["first", "middle"])
def test_eos_inside_an_accepted_block(target, target_copy, prompt_ids, reference, k, where):
    """An EOS id that the model emits at a chosen position: everything after it in the block is dropped."""
    i = 0
    ref = reference[i]
    pos = 0 if where == "first" else next(p for p in range(7, REF_LEN) if ref[p] not in ref[:p])
    eos_model = dataclasses.replace(target, eos_token_ids=[ref[pos]])
    drafter = ModelDrafter(target_copy, max_batch=2, max_model_len=MAX_MODEL_LEN) if k else None
    engine = _engine(eos_model, drafter, 2)
    seqs = run_checked(engine, [_request(i, prompt_ids[i], REF_LEN, k=k, ignore_eos=False),
                                _request(1, prompt_ids[1], 17, k=k)])
    assert seqs[0].output_ids == ref[: pos + 1]
    assert seqs[0].finish_reason.value == "stop"
    assert seqs[1].output_ids == reference[1][:17]  # the other row is unaffected (ignore_eos)
    if drafter is not None:
        assert not drafter.states


def _pick_stop_string(text: str) -> str:
    """A 3-character run of letters/spaces from the second half of the text."""
    half = len(text) // 2
    m = re.search(r"[A-Za-z ]{3}", text[half:])
    assert m, f"no usable stop string in {text!r}"
    return m.group(0)


@pytest.mark.parametrize("k", [0, 3, 5])
def test_stop_string_cuts_text_and_tokens(target, target_copy, prompt_ids, reference, k):
    tok = target.tokenizer
    requests, expected = [], []
    for i, ids in enumerate(prompt_ids):
        ref = reference[i]
        stop = _pick_stop_string(tok.decode(ref, skip_special_tokens=True))
        # the engine stops after the first token whose prefix text contains the stop string
        end = next(n for n in range(1, REF_LEN + 1) if stop in tok.decode(ref[:n], skip_special_tokens=True))
        text = tok.decode(ref[:end], skip_special_tokens=True)
        expected.append((ref[:end], text[: text.find(stop)]))
        requests.append(_request(i, ids, REF_LEN, k=k, stop=["\x00never", stop]))
    drafter = ModelDrafter(target_copy, max_batch=8, max_model_len=MAX_MODEL_LEN) if k else None
    engine = _engine(target, drafter, 8)
    seqs = run_checked(engine, requests)
    for s, (tokens, text) in zip(seqs, expected):
        assert s.output_ids == tokens
        assert engine.text(s) == text
        assert s.request.stop[1] not in engine.text(s)
        assert s.finish_reason.value == "stop"


def _stop_case(tok, ref: list[int]) -> tuple[str, int]:
    """A stop string from the reference text and the number of tokens after which it first appears."""
    stop = _pick_stop_string(tok.decode(ref, skip_special_tokens=True))
    end = next(n for n in range(1, len(ref) + 1) if stop in tok.decode(ref[:n], skip_special_tokens=True))
    return stop, end


@pytest.mark.parametrize("k,inside", [(0, False), (5, False), (5, True)])
def test_stop_string_in_the_step_that_reaches_max_tokens(target, target_copy, prompt_ids, reference, k, inside):
    """The stop string completes at token `end` and max_tokens is reached in the same step: at `end` itself, or
    (inside) one token later, in the same block of a k = 5 step with the target as drafter (after the prefill token,
    steps emit tokens 2-7, 8-13, ...). The stop string must still cut the text, and win over "length"."""
    tok = target.tokenizer
    for i, ref in enumerate(reference):
        stop, end = _stop_case(tok, ref)
        if not inside or (end >= 2 and (end - 1) % 6 != 0):  # `end` is not the last token of its block
            break
    else:
        pytest.fail("no prompt has a stop string inside a block")
    drafter = ModelDrafter(target_copy, max_batch=1, max_model_len=MAX_MODEL_LEN) if k else None
    engine = _engine(target, drafter, 1)
    (s,) = run_checked(engine, [_request(i, prompt_ids[i], end + int(inside), k=k, stop=[stop])])
    text = tok.decode(reference[i][:end], skip_special_tokens=True)
    assert s.output_ids == reference[i][:end]
    assert engine.text(s) == text[: text.find(stop)]
    assert s.finish_reason.value == "stop"


def test_stop_string_before_eos_in_the_same_block(target, target_copy, prompt_ids, reference):
    """k = 5 with the target as drafter: after the prefill token, every step emits tokens 6m + 2 .. 6m + 7. Find a
    stop string completing at some token and make a later token of the same block the EOS id."""
    tok = target.tokenizer
    for i, ref in enumerate(reference):
        stop, end = _stop_case(tok, ref)
        block = (end - 2) // 6
        later = [e for e in range(end + 1, min(6 * block + 8, REF_LEN + 1)) if ref[e - 1] not in ref[: e - 1]]
        if end >= 2 and later:
            break
    else:
        pytest.fail("no prompt has a stop string and a fresh token later in the same block")
    eos_model = dataclasses.replace(target, eos_token_ids=[ref[later[0] - 1]])
    engine = _engine(eos_model, ModelDrafter(target_copy, max_batch=1, max_model_len=MAX_MODEL_LEN), 1)
    (s,) = run_checked(engine, [_request(i, prompt_ids[i], REF_LEN, k=5, stop=[stop], ignore_eos=False)])
    text = tok.decode(ref[:end], skip_special_tokens=True)
    assert s.output_ids == ref[:end]
    assert engine.text(s) == text[: text.find(stop)]
    assert s.finish_reason.value == "stop"


def test_stop_string_absent_runs_to_length(target, prompt_ids, reference):
    engine = _engine(target, NgramDrafter(), 8)
    seqs = run_checked(engine, [_request(i, ids, 17, k=3, stop=["\x00\x01never"]) for i, ids in
                                enumerate(prompt_ids)])
    for i, s in enumerate(seqs):
        assert s.output_ids == reference[i][:17] and s.finish_reason.value == "length"
        assert engine.text(s) == target.tokenizer.decode(reference[i][:17], skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------------- abort


def test_abort_frees_the_slot_and_the_draft_state(target, target_copy, prompt_ids):
    drafter = ModelDrafter(target_copy, max_batch=2, max_model_len=MAX_MODEL_LEN)
    engine = _engine(target, drafter, 2)
    seqs = [engine.add_request(_request(i, prompt_ids[i], REF_LEN, k=3)) for i in range(3)]
    engine.step()  # admits r0 and r1 (prefill); r2 waits
    engine.step()
    assert engine.runner.num_free_slots == 0 and len(engine.waiting) == 1
    assert set(drafter.states) == {"r0", "r1"}

    engine.abort("r0")
    assert seqs[0].finish_reason.value == "abort" and seqs[0].slot == -1
    assert engine.runner.num_free_slots == 1
    assert "r0" not in drafter.states and drafter.cache.num_free == 1
    engine.abort("r2")  # still waiting: removed from the queue
    assert seqs[2].finish_reason.value == "abort" and not engine.waiting
    assert seqs[2].output_ids == []
    engine.abort("r0")  # aborting twice, or an unknown id, is a no-op
    engine.abort("nope")
    assert engine.runner.num_free_slots == 1


@pytest.mark.parametrize("drafted", [False, True])
def test_stepping_after_abort_leaves_other_sequences_exact(target, target_copy, prompt_ids, reference, drafted):
    drafter = ModelDrafter(target_copy, max_batch=2, max_model_len=MAX_MODEL_LEN) if drafted else None
    engine = _engine(target, drafter, 2)
    seqs = [engine.add_request(_request(i, prompt_ids[i], REF_LEN, k=3)) for i in range(2)]
    engine.step()
    engine.step()
    verified: list[str] = []
    verify = engine.runner.verify

    def spy(seqs_, proposals, layers=()):
        verified.extend(x.seq_id for x in seqs_)
        return verify(seqs_, proposals, layers)

    engine.runner.verify = spy
    engine.abort("r0")  # r0 holds slot 0, r1 the last slot (1)
    produced = len(seqs[0].output_ids)
    events = []
    while engine.has_work:
        events += engine.step()
    assert "r0" not in verified, "an aborted sequence must not be verified again"
    assert all(ev.seq_id == "r1" for ev in events)
    assert len(seqs[0].output_ids) == produced
    assert seqs[1].output_ids == reference[1] and seqs[1].finish_reason.value == "length"
    assert engine.runner.num_free_slots == 2
    # the freed slots are reused, and output in a reused slot is still exact
    seqs = run_checked(engine, [_request(10 + i, prompt_ids[i], 17, k=3) for i in range(4)])
    for i, s in enumerate(seqs):
        assert s.output_ids == reference[i][:17]


def test_finished_slots_are_reused_exactly(target, target_copy, prompt_ids, reference):
    """One engine, several waves of requests through 2 slots: reused slots (stale keys from earlier sequences
    still in them) must not leak into later outputs."""
    drafter = ModelDrafter(target_copy, max_batch=2, max_model_len=MAX_MODEL_LEN)
    engine = _engine(target, drafter, 2)
    for wave in range(2):
        order = list(range(len(prompt_ids)))[:: 1 if wave == 0 else -1]
        seqs = run_checked(engine, [_request(10 * wave + i, prompt_ids[i], 17, k=3) for i in order])
        for i, s in zip(order, seqs):
            assert s.output_ids == reference[i][:17]


# -------------------------------------------------------------------------------------------------- validation


def test_prompt_plus_max_tokens_over_context_is_refused(target, prompt_ids):
    engine = _engine(target, None, 1, max_model_len=32)
    ids = prompt_ids[6]
    engine.add_request(_request(0, ids, 32 - len(ids), k=0))  # exactly at the limit: fine
    with pytest.raises(ValueError, match=r"maximum context length is 32 tokens.*max_tokens is") as err:
        engine.add_request(_request(1, ids, 33 - len(ids), k=0))
    assert str(len(ids)) in str(err.value)
    assert "r1" not in engine.sequences and len(engine.waiting) == 1


def test_max_model_len_is_capped_by_the_model(target):
    engine = SpecEngine(target, max_batch=1, max_model_len=10**6)
    assert engine.max_model_len == target.model.args.max_position_embeddings


@pytest.mark.parametrize("bad,match", [
    (dict(prompt_ids=[]), "prompt is empty"),
    (dict(max_tokens=0), "max_tokens must be >= 1"),
    (dict(num_draft_tokens=17), r"num_draft_tokens must be in \[0, 16\]"),
    (dict(num_draft_tokens=-1), "num_draft_tokens"),
    (dict(prompt_ids=[1, 384]), "out of range"),
    (dict(prompt_ids=[-1]), "out of range"),
])
def test_invalid_requests_are_refused(target, bad, match):
    engine = _engine(target, None, 1)
    request = dataclasses.replace(Request("x", [1, 2, 3], max_tokens=4), **bad)
    with pytest.raises(ValueError, match=match):
        engine.add_request(request)
    assert not engine.sequences and not engine.waiting


def test_duplicate_request_id_is_refused(target):
    engine = _engine(target, None, 1)
    engine.add_request(Request("x", [1, 2, 3], max_tokens=4))
    with pytest.raises(ValueError, match="duplicate request id"):
        engine.add_request(Request("x", [4, 5], max_tokens=4))
