"""A draft worker prepares blocks, while the target verifies, for the verdicts a block is likely to get, and answers
such a verdict at once: a branch of the drafter's tree the target takes instead of the block's first branch, or the
whole block accepted, each followed by the drafter's guess for the target's next token. Output stays the target's."""

from __future__ import annotations

import time

import pytest

from workers.drafters.base import DraftProposal, Drafter
from workers.engine.engine import SpecEngine
from workers.engine.remote_draft import RemoteDraftClient
from workers.engine.sequence import Request
from workers.models.loader import load_model
from workers.servers.draft_server import serve_draft

K = 3
MAX_TOKENS = 24
PROMPTS = ["The quick brown fox", "def add(a, b):"]


@pytest.fixture(scope="module")
def target(tiny_llama):
    return load_model(str(tiny_llama))


@pytest.fixture(scope="module")
def reference(target):
    """Target-only greedy output per prompt, and the oracle's map: context -> the target's continuation."""
    engine = SpecEngine(target, None, max_batch=1)
    prompts = [target.tokenizer.encode(p) for p in PROMPTS]
    outs = [s.output_ids for s in engine.run([Request(f"r{i}", ids, max_tokens=MAX_TOKENS + K + 2,
                                                      num_draft_tokens=0, ignore_eos=True)
                                              for i, ids in enumerate(prompts)])]
    future = {}
    for ids, out in zip(prompts, outs):
        for i in range(len(out) + 1):
            future[tuple(ids + out[:i])] = out[i:]
    return prompts, [o[:MAX_TOKENS] for o in outs], future


class _Oracle(Drafter):
    """Knows the target's continuation. `wrong_first`: its tree's first branch starts with a wrong token and the
    right one is a branch beside it (so every verdict rejects the block's first token and the target picks the
    branch); otherwise a short chain of `n` right tokens (so every verdict accepts the whole block and adds the
    target's next token, which the oracle would have drafted next)."""

    def __init__(self, future, vocab_size, wrong_first: bool, n: int = 2):
        self.future, self.vocab, self.wrong_first, self.n = future, vocab_size, wrong_first, n

    def propose(self, requests):
        out = []
        for r in requests:
            nxt = self.future.get(tuple(r.token_ids), [])[: min(r.k, self.n)]
            if not nxt:
                out.append(DraftProposal())
            elif self.wrong_first:
                wrong = (nxt[0] + 1) % self.vocab
                out.append(DraftProposal([wrong, nxt[0]], None, [0.5, 0.4], [-1, -1]))
            else:
                out.append(DraftProposal(nxt, None, [0.9] * len(nxt)))
        return out


def _decode(target, prompts, client, verify_s=0.02):
    """Batch 1, greedy; each verification takes at least verify_s (a target slower than the drafter, as a real one
    is), which is when the draft worker prepares blocks."""
    send = client.verdict

    def slow_verdict(*args, **kwargs):
        time.sleep(verify_s)
        send(*args, **kwargs)

    client.verdict = slow_verdict
    engine = SpecEngine(target, client, max_batch=1)
    seqs = engine.run([Request(f"p{i}", ids, max_tokens=MAX_TOKENS, num_draft_tokens=K, ignore_eos=True)
                       for i, ids in enumerate(prompts)])
    return [s.output_ids for s in seqs], sum(s.num_drafts for s in seqs), seqs


@pytest.mark.parametrize("wrong_first", [True, False], ids=["branch-picked", "block-accepted"])
def test_likely_verdicts_are_answered_with_prepared_blocks(target, reference, wrong_first):
    prompts, ref, future = reference
    results = {}
    for hyps in (6, 0):  # 0: the negative control, blocks drafted only after each verdict
        server, worker, port = serve_draft(_Oracle(future, target.vocab_size, wrong_first), "oracle",
                                           max_hypotheses=hyps)
        client = RemoteDraftClient(f"127.0.0.1:{port}", k=K, max_wait_s=2.0)
        try:
            outs, steps, seqs = _decode(target, prompts, client)
            results[hyps] = (outs, steps, worker.prepared_hits, worker.hypotheses_drafted, seqs)
        finally:
            client.close()
            worker.stop()
            server.stop(0)
    for hyps, (outs, steps, hits, drafted, seqs) in results.items():
        assert outs == ref, hyps  # exact either way
    outs, steps, hits, drafted, seqs = results[6]
    # every verdict but each sequence's first (and a rare race with the verdict) was one the worker had prepared
    assert hits >= 0.8 * (steps - len(prompts)), (hits, steps)
    assert drafted >= hits
    if wrong_first:  # each step: the tree verified whole, the first branch rejected, the second accepted
        assert all(s.num_accepted_tokens == s.num_drafts > 0 for s in seqs), [
            (s.num_accepted_tokens, s.num_drafts) for s in seqs]
    else:  # each block fully accepted
        assert all(s.num_accepted_tokens == s.num_draft_tokens > 0 for s in seqs)
    assert results[0][2] == 0 and results[0][3] == 0  # the control prepared nothing


def test_prepared_blocks_are_sent_only_for_the_exact_context(target, reference):
    """The branch the oracle offers is wrong too: nothing prepared ever matches a verdict, and the worker falls
    back to drafting after each verdict without sending a stale block."""
    prompts, ref, future = reference

    class _WrongBranches(_Oracle):
        def propose(self, requests):
            out = super().propose(requests)
            for p in out:
                if p.parents:
                    p.tokens[1] = (p.tokens[1] + 2) % self.vocab
            return out

    server, worker, port = serve_draft(_WrongBranches(future, target.vocab_size, True), "wrong", max_hypotheses=6)
    client = RemoteDraftClient(f"127.0.0.1:{port}", k=K, max_wait_s=2.0)
    try:
        outs, steps, _ = _decode(target, prompts, client)
        assert outs == ref
        assert worker.hypotheses_drafted > 0 and worker.prepared_hits == 0
    finally:
        client.close()
        worker.stop()
        server.stop(0)
