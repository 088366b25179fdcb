"""The target <-> draft gRPC stream on loopback, with the engine loop unchanged: exact output, tau == k + 1 with
draft == target through run-ahead and epochs, a draft slower than the target still contributing, cleanup."""

from __future__ import annotations

import time

import pytest

from workers.drafters.base import DraftProposal
from workers.drafters.model import ModelDrafter
from workers.engine.engine import SpecEngine
from workers.engine.remote_draft import RemoteDraftClient
from workers.engine.sequence import Request
from workers.models.loader import load_model
from workers.servers.draft_server import serve_draft

K = 3
PROMPTS = ["The quick brown fox", "def add(a, b):", "Hello world! How", "1 + 1 = 2, 2 +"]


@pytest.fixture(scope="module")
def target(tiny_llama):
    return load_model(str(tiny_llama))


def _run(target, draft, max_batch, max_tokens, k=K):
    engine = SpecEngine(target, draft, max_batch=max_batch)
    reqs = [Request(f"r{i}", target.tokenizer.encode(p), max_tokens=max_tokens, num_draft_tokens=k, ignore_eos=True)
            for i, p in enumerate(PROMPTS)]
    return engine.run(reqs), engine


def _wait_empty(worker, timeout=5.0):
    deadline = time.monotonic() + timeout
    while worker.seqs and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(worker.seqs)


class _Recording(ModelDrafter):
    """Records how many tokens each propose asks for."""

    asked: list[int]

    def propose(self, requests):
        self.asked += [r.k for r in requests]
        return super().propose(requests)


@pytest.mark.parametrize("ahead", [1, 2])
@pytest.mark.parametrize("max_batch", [1, 4])
def test_remote_self_draft_is_exact_and_fully_accepted(target, tiny_llama, ahead, max_batch):
    max_tokens = 1 + (K + 1) * 8
    ref, _ = _run(target, None, max_batch, max_tokens, k=0)
    drafter = _Recording(load_model(str(tiny_llama)))
    drafter.asked = []
    server, worker, port = serve_draft(drafter, "model:self", ahead_blocks=ahead)
    client = RemoteDraftClient(f"127.0.0.1:{port}", k=K, max_wait_s=2.0)
    try:
        seqs, engine = _run(target, client, max_batch, max_tokens)
        assert [s.output_ids for s in seqs] == [s.output_ids for s in ref]
        assert engine.fallback_steps == 0
        for s in seqs:
            assert s.num_accepted_tokens == s.num_draft_tokens and s.tau == K + 1
        assert _wait_empty(worker) == 0  # finished sequences are freed on the draft worker
        # blocks are k + 1 tokens (a guess at the target's own token) only where a block may follow before the
        # verdict; without run-ahead the extra token would be drafted for nothing
        assert set(drafter.asked) == ({K} if ahead == 1 else {K + 1})
    finally:
        client.close()
        worker.stop()
        server.stop(0)


class _SlowDrafter(ModelDrafter):
    """draft == target, but each propose costs several target steps."""

    def propose(self, requests):
        time.sleep(0.03)
        return super().propose(requests)


def test_a_draft_slower_than_the_target_still_contributes(target, tiny_llama):
    """The target's wait adapts to the draft's latency and the draft salvages blocks overtaken by fallback steps;
    without either, a draft slower than a plain target step never lands a single token."""
    ref, _ = _run(target, None, 4, 60, k=0)
    server, worker, port = serve_draft(_SlowDrafter(load_model(str(tiny_llama))), "slow")
    client = RemoteDraftClient(f"127.0.0.1:{port}", k=K, max_wait_s=0.001)
    try:
        seqs, engine = _run(target, client, 4, 60)
        assert [s.output_ids for s in seqs] == [s.output_ids for s in ref]
        accepted = sum(s.num_accepted_tokens for s in seqs)
        assert accepted > 20, accepted
    finally:
        client.close()
        worker.stop()
        server.stop(0)


class _BranchDrafter(ModelDrafter):
    """draft == target, sent as a token tree whose first branch is wrong: the root's first child is a token the
    target never picks, the right block hangs under its second child. Verifying only the first branch accepts
    nothing; verifying the tree accepts every token."""

    def propose(self, requests):
        out = []
        for r, p in zip(requests, super().propose(requests)):
            if not p.tokens:
                out.append(p)
                continue
            wrong = (p.tokens[0] + 1) % 50
            out.append(DraftProposal([wrong] + p.tokens, parents=[-1, -1] + list(range(1, len(p.tokens)))))
        return out


@pytest.mark.parametrize("ahead", [1, 2])
def test_a_streamed_token_tree_is_verified_whole(target, tiny_llama, ahead):
    max_tokens = 1 + (K + 1) * 6
    ref, _ = _run(target, None, 2, max_tokens, k=0)
    server, worker, port = serve_draft(_BranchDrafter(load_model(str(tiny_llama))), "branchy", ahead_blocks=ahead)
    client = RemoteDraftClient(f"127.0.0.1:{port}", k=K, max_wait_s=2.0)
    try:
        seqs, engine = _run(target, client, 2, max_tokens)
        assert [s.output_ids for s in seqs] == [s.output_ids for s in ref]
        assert engine.fallback_steps == 0
        # every step took the second branch, against the first-branch assumption: a new epoch each time, and
        # still every drafted block fully accepted
        for s in seqs:
            assert s.tau == K + 1, (s.tau, s.num_draft_tokens, s.num_accepted_tokens)
        assert _wait_empty(worker) == 0
    finally:
        client.close()
        worker.stop()
        server.stop(0)
