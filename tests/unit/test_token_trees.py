"""Token-tree verification: the target scores a whole tree of draft tokens in one forward pass and keeps the longest
path it agrees with. Checked here: the tree-masked forward equals running each root-to-node path as a chain, the
accepted path's KV entries are moved into place, greedy output stays exactly target-only with trees that put the
right tokens in a later branch, sampled rows verify a chain, and learned drafters' trees are exact too.
"""

from __future__ import annotations

import pytest
import torch

from tests.unit import test_learned_drafters as learned
from tests.unit.test_learned_drafters import MAX_LEN, PROMPTS, target  # noqa: F401 (target: the shared fixture)
from workers.drafters.base import DraftProposal
from workers.drafters.learned import MAX_TREE_NODES, DraftRequest, Drafter
from workers.drafters.registry import build_drafter
from workers.engine.draft_client import InProcessDraftClient
from workers.engine.engine import SpecEngine
from workers.models.loader import load_model
from workers.params import SamplingParams

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _engine(target, drafter):  # three slots for six prompts: sequences join and leave between steps
    return learned._engine(target, drafter, max_batch=3)


def _requests(target, k, **kw):
    return learned._requests([target.tokenizer.encode(p) for p in PROMPTS], k, **kw)


# ------------------------------------------------------------------------------------------- the proposal type
def test_within_and_main_chain_keep_a_valid_tree():
    #        root -> 0 -> 1 -> 2        (first branch)
    #        root -> 3 -> 4, 3 -> 5     (second branch, forked at depth 2)
    p = DraftProposal([10, 11, 12, 13, 14, 15], None, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [-1, 0, 1, -1, 3, 3])
    assert p.is_tree and p.depth() == 3
    assert p.main_chain().tokens == [10, 11, 12] and not p.main_chain().is_tree
    cut = p.within(max_depth=2, max_nodes=16)
    assert cut.tokens == [10, 11, 13, 14, 15] and cut.parents == [-1, 0, -1, 2, 2]
    assert cut.confidence == [0.9, 0.8, 0.6, 0.5, 0.4]
    few = p.within(max_depth=7, max_nodes=4)
    assert few.tokens == [10, 11, 12, 13] and few.parents == [-1, 0, 1, -1]
    # path survivals: 0.9 0.72 0.504 | 0.6 0.3 0.24 -> the best four are nodes 0, 1, 3, 2 (ancestors first)
    best = p.best_nodes(4)
    assert best.tokens == [10, 11, 12, 13] and best.parents == [-1, 0, 1, -1]
    best = p.best_nodes(5)
    assert best.tokens == [10, 11, 12, 13, 14] and best.parents == [-1, 0, 1, -1, 3]
    chain = DraftProposal([1, 2, 3, 4])
    assert not chain.is_tree and chain.depth() == 4 and chain.within(2, 16).tokens == [1, 2]
    assert not DraftProposal([1, 2], parents=[-1, 0]).is_tree  # parents that spell a chain are a chain
    probs = torch.rand(2, 5)
    as_chain = DraftProposal([1, 2], probs, None, [-1, 0]).within(7, 16)
    assert as_chain.parents is None and torch.equal(as_chain.probs, probs)  # a chain keeps its distributions
    for bad in ([-1, 1], [-1], [-1, -2], [0, 0]):  # a parent that is not an earlier node, or a wrong length
        assert DraftProposal([1, 2], parents=bad).within(7, 16).tokens == []
    assert DraftProposal([1, 2], probs, None, [-1, -1]).within(7, 16).tokens == []  # trees are greedy only


def test_after_first_is_the_proposal_for_the_context_extended_by_its_first_token():
    p = DraftProposal([10, 11, 12, 13, 14, 15], None, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [-1, 0, 1, -1, 3, 0])
    rest = p.after_first()  # node 0's subtree: 11 -> 12 and 15, re-rooted at the context
    assert rest.tokens == [11, 12, 15] and rest.parents == [-1, 0, -1] and rest.confidence == [0.8, 0.7, 0.4]
    assert rest.main_chain().tokens == [11, 12]
    probs = torch.rand(3, 5)
    chain = DraftProposal([1, 2, 3], probs, [0.5, 0.4, 0.3]).after_first()
    assert chain.tokens == [2, 3] and torch.equal(chain.probs, probs[1:]) and chain.confidence == [0.4, 0.3]
    assert DraftProposal().after_first().tokens == [] and DraftProposal([7]).after_first().tokens == []


# ------------------------------------------------------------------------------------- the tree-masked forward
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])  # gemma3: sliding-window layers (window 8)
def test_tree_forward_equals_each_path_as_a_chain(tiny_models, family):
    model = load_model(str(tiny_models[family])).model
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(model.args.vocab_size, (1, 11), generator=g)
    parents = [-1, 0, 1, 0, 3, 3, 0, 2, -1]  # row position 0 is the pending token; 8 is a second root
    nodes = torch.randint(model.args.vocab_size, (1, len(parents)), generator=g)
    cache = model.new_cache(2, 64)
    with torch.inference_mode():
        model(prompt, cache, [0])
        tree_out = model(nodes, cache, [0], tree=torch.tensor([parents]))
        flat_out = None
        for t in range(len(parents)):
            path = [t]
            while parents[path[-1]] >= 0:
                path.append(parents[path[-1]])
            path.reverse()
            cache.rollback(0, 11)
            chain = model(nodes[:, path], cache, [0])
            torch.testing.assert_close(tree_out.logits[0, t], chain.logits[0, -1], atol=1e-4, rtol=0,
                                       msg=lambda m: f"node {t} (path {path}): {m}")
        cache.rollback(0, 11)
        flat_out = model(nodes, cache, [0])  # negative control: the same tokens read as one chain
    assert not torch.allclose(flat_out.logits[0, 4], tree_out.logits[0, 4], atol=1e-3)


def test_compact_moves_the_accepted_path_into_place(target):
    cache = target.model.new_cache(2, 32)
    for t in cache.k + cache.v:
        t.copy_(torch.arange(32, dtype=t.dtype)[None, None, :, None].expand_as(t))
    cache.lengths[1] = 20
    cache.compact(1, 10, [0, 3, 4, 7])
    for t in cache.k + cache.v:
        assert t[1, 0, 8:16, 0].tolist() == [8, 9, 10, 13, 14, 17, 14, 15]  # 10.. now holds 10, 13, 14, 17
        assert t[0, 0, 8:16, 0].tolist() == list(range(8, 16))  # other slots untouched


# ------------------------------------------------------------------------------------------ engine exactness
class OracleTreeDrafter(Drafter):
    """Knows the target-only continuations and hides them in trees: the first branch starts wrong, the second
    branch is right but forks at depth 3 with a wrong sibling first. A verifier that only looked at the first
    branch, or a cache that kept the wrong branch's keys, would change the output or accept less."""

    def __init__(self, refs: list[list[int]], vocab: int):
        self.refs, self.vocab = refs, vocab
        self.trees = 0

    def propose(self, requests: list[DraftRequest]) -> list[DraftProposal]:
        out = []
        for r in requests:
            ref = next((x for x in self.refs if x[: len(r.token_ids)] == r.token_ids), None)
            right = [] if ref is None else ref[len(r.token_ids): len(r.token_ids) + r.k]
            if not right:
                out.append(DraftProposal())
                continue
            wrong = [(t + 1) % self.vocab for t in right]
            tokens, parents = [wrong[0]] + right[1:3], [-1, 0, 1][: min(3, len(right))]
            prev = -1
            for d, tok in enumerate(right):
                if d == 2:
                    tokens.append(wrong[d])
                    parents.append(prev)
                tokens.append(tok)
                parents.append(prev)
                prev = len(tokens) - 1
            out.append(DraftProposal(tokens, None, None, parents))
            self.trees += 1
        return out


class FirstBranch(Drafter):
    def __init__(self, inner: Drafter):
        self.inner = inner

    def propose(self, requests):
        return [p.main_chain() for p in self.inner.propose(requests)]


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_trees_are_exact_and_accepted_through_later_branches(target, k):
    reqs = _requests(target, 0)
    ref = [s.output_ids for s in _engine(target, None).run(reqs)]
    drafter = OracleTreeDrafter([r.prompt_ids + o for r, o in zip(reqs, ref)], target.vocab_size)
    seqs = _engine(target, drafter).run(_requests(target, k))
    assert [s.output_ids for s in seqs] == ref
    assert drafter.trees > 0
    # every step accepts k tokens except where max_tokens cuts the last draft short
    for s in seqs:
        assert s.num_accepted_tokens >= k * (len(s.output_ids) - 1) / (k + 1) - k and s.tau > k


def test_sampled_rows_verify_the_first_branch(target):
    """A sampled row gets the tree's first branch as a chain: the same seed gives the same output as a drafter
    that proposes that chain itself (same draft tokens -> same rejection-sampling draws)."""
    greedy = _requests(target, 0)
    ref = [s.output_ids for s in _engine(target, None).run(greedy)]
    refs = [r.prompt_ids + o for r, o in zip(greedy, ref)]

    def run(drafter):
        reqs = _requests(target, 3, params=SamplingParams(temperature=0.8, seed=7))
        reqs[0] = _requests(target, 3)[0]  # one greedy row in the mix
        return [s.output_ids for s in _engine(target, drafter).run(reqs)]

    with_trees = run(OracleTreeDrafter(refs, target.vocab_size))
    assert with_trees == run(FirstBranch(OracleTreeDrafter(refs, target.vocab_size)))
    assert with_trees[0] == ref[0]  # the greedy row still used (and verified) its tree


# -------------------------------------------------------------------------------------------- learned drafters
@pytest.fixture(scope="module")
def untrained(tiny_llama, tmp_path_factory):
    """A freshly initialised head of each kind (exactness does not depend on training)."""
    from training.train import main as train_main

    out = {}
    data = tmp_path_factory.mktemp("tree-data")
    tok = load_model(str(tiny_llama)).tokenizer
    rows = [f'{{"prompt_ids": {tok.encode(p)}, "answer_ids": {tok.encode(p)[::-1]}}}' for p in PROMPTS]
    (data / "train.jsonl").write_text("\n".join(rows) + "\n")
    (data / "heldout.jsonl").write_text(rows[0] + "\n")
    for kind in ("mtp1", "eagle", "dspark"):
        path = tmp_path_factory.mktemp(f"tree-{kind}")
        assert train_main(["--target", str(tiny_llama), "--drafter", kind, "--data", str(data), "--out", str(path),
                           "--max-steps", "1", "--batch-tokens", "512", "--eval-every", "1", "--target-dtype", "fp32",
                           "--draft-vocab", "0", "--lr", "1e-9", "--block-size", "1" if kind == "mtp1" else "4",
                           "--intermediate-size", "64", "--device", "cpu", "--no-progress"]) == 0
        out[kind] = path
    return out


class Recording(InProcessDraftClient):
    def __init__(self, drafter):
        super().__init__(drafter)
        self.proposals: list[DraftProposal] = []

    def drafts(self, requests):
        got = super().drafts(requests)
        self.proposals += got
        return got


@pytest.mark.parametrize("kind", ["mtp1", "eagle", "dspark"])
def test_learned_drafters_draft_exact_trees(target, untrained, kind):
    k = 1 if kind == "mtp1" else 4
    ref = [s.output_ids for s in _engine(target, None).run(_requests(target, 0))]
    drafter = build_drafter(f"{kind}:{untrained[kind]}", target, max_batch=3, max_model_len=MAX_LEN,
                            min_confidence=0.0, tree_width=3)
    client = Recording(drafter)
    engine = SpecEngine(target, client, max_batch=3, max_model_len=MAX_LEN)
    assert [s.output_ids for s in engine.run(_requests(target, k))] == ref
    trees = [p for p in client.proposals if p.is_tree]
    assert trees and all(sum(x < 0 for x in p.parents) == 3 for p in trees)  # three first tokens each
    assert all(len(set(p.tokens[i] for i, x in enumerate(p.parents) if x < 0)) == 3 for p in trees)
    if kind == "dspark":  # its runners-up continue with the Markov head: branches deeper than one token
        assert any(p.depth() == k and len(p.tokens) > k + 2 for p in trees)
    if kind == "eagle":  # runners-up beside every position of the chain: two per drafted position
        for p in trees:
            chain = p.main_chain().tokens
            assert len(p.tokens) == min(3 * len(chain), MAX_TREE_NODES) or len(p.tokens) == MAX_TREE_NODES
        assert any(p.parents.count(0) == 3 for p in trees)  # the chain's first token has three children
    with pytest.raises(ValueError, match="tree_width"):
        build_drafter(f"{kind}:{untrained[kind]}", target, tree_width=0)


def test_the_in_process_server_drafts_trees(tiny_llama, untrained, target):
    from cluster.local_serve import build_stack

    stack = build_stack(str(tiny_llama), draft=f"dspark:{untrained['dspark']}", k=4, max_batch=2,
                        max_model_len=MAX_LEN, tree_width=3)
    stack.async_engine.shutdown()  # drive its engine directly below, with no engine thread beside it
    assert stack.engine.draft.drafter.tree_width == 3
    ref = [s.output_ids for s in _engine(target, None).run(_requests(target, 0))]
    assert [s.output_ids for s in stack.engine.run(_requests(target, 4))] == ref
