"""The drafter interface: every way of proposing draft tokens implements it.

A drafter is told, for each sequence, the full token context it should continue and how many draft tokens are
wanted; it answers with up to that many tokens and, when it samples, the distribution it sampled them from.
Stating the context in every request (instead of pushing "accepted" / "rejected" events) makes the drafter's state
a cache it can always repair: a model drafter keeps a KV cache keyed by the tokens it has seen, rolls it back to the
longest common prefix with the new context, and prefills the rest. That is what lets the same drafter run in the
engine's process (context = committed tokens) and in a draft worker that runs ahead of verification
(context = committed tokens + tokens it assumes will be accepted) without a second code path.

Learned drafters (mtp1, eagle, dspark) also read the target's hidden states at committed positions; the target
hands them over with `observe_target_features` after each verification step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from workers.params import SamplingParams


@dataclass
class DraftRequest:
    seq_id: str
    token_ids: list[int]  # the context to continue: prompt + committed output (+ assumed tokens when running ahead)
    k: int  # number of draft tokens wanted (0 is allowed and returns an empty proposal)


@dataclass
class DraftProposal:
    tokens: list[int] = field(default_factory=list)  # [<= k]
    # [len(tokens), vocab] float32 distribution the tokens were sampled from, after the request's temperature /
    # top-k / top-p; None means a point mass on each token (greedy or model-free drafters).
    probs: torch.Tensor | None = None
    # dspark: per token, the predicted probability that it is accepted given the tokens before it were
    confidence: list[float] | None = None
    # A draft tree instead of a chain (greedy only): parents[i] is the index in `tokens` of token i's parent, -1
    # for a child of the last committed token; parents come before their children. None means a chain.
    parents: list[int] | None = None

    @property
    def is_tree(self) -> bool:
        return self.parents is not None and any(p != i - 1 for i, p in enumerate(self.parents))

    def depth(self) -> int:
        """Tokens on the longest root-to-leaf path: what verifying this proposal can commit at most, minus one."""
        if self.parents is None:
            return len(self.tokens)
        return max(self._depths(), default=0)

    def _depths(self) -> list[int]:  # per node: tokens from the root down to it
        d: list[int] = []
        for p in self.parents:
            d.append(1 if p < 0 else d[p] + 1)
        return d

    def _subtree(self, keep: list[int]) -> DraftProposal:
        """The nodes at these ascending indices, parents re-pointed (every kept node's parent is kept)."""
        new = {old: j for j, old in enumerate(keep)}
        return DraftProposal([self.tokens[i] for i in keep], None,
                             None if self.confidence is None else [self.confidence[i] for i in keep],
                             [-1 if self.parents[i] < 0 else new[self.parents[i]] for i in keep])

    def within(self, max_depth: int, max_nodes: int) -> DraftProposal:
        """This proposal cut to at most max_depth tokens deep and max_nodes tokens in all (a chain is cut to
        min of both; a tree keeps its first nodes that are shallow enough, which is again a tree). The engine
        calls it on every proposal: malformed parents (a wrong length, a parent that is not an earlier node) or a
        tree with draft distributions give an empty proposal, i.e. a plain target step, never a wrong mask."""
        if self.parents is not None and (
                len(self.parents) != len(self.tokens) or any(not -1 <= p < i for i, p in enumerate(self.parents))
                or (self.probs is not None and self.is_tree)):
            return DraftProposal()  # not a tree (or one with draft distributions, which only chains may carry)
        if not self.is_tree:
            n = min(max_depth, max_nodes)
            if len(self.tokens) <= n and self.parents is None:
                return self
            return DraftProposal(self.tokens[:n], None if self.probs is None else self.probs[:n],
                                 None if self.confidence is None else self.confidence[:n])
        keep: list[int] = []
        for i, (p, d) in enumerate(zip(self.parents, self._depths())):
            if d <= max_depth and len(keep) < max_nodes and (p < 0 or p in keep):
                keep.append(i)
        return self if len(keep) == len(self.tokens) else self._subtree(keep)

    def best_nodes(self, n: int) -> DraftProposal:
        """A tree cut to its n most promising nodes: those whose path survival, the product of `confidence` from
        the root down to the node, is highest. Survival never grows down a path, so every kept node's ancestors
        are kept too (ties go to the earlier node, which is the ancestor)."""
        if self.parents is None or len(self.tokens) <= n or self.confidence is None:
            return self
        score: list[float] = []
        for i, p in enumerate(self.parents):
            score.append(self.confidence[i] * (1.0 if p < 0 else score[p]))
        return self._subtree(sorted(sorted(range(len(score)), key=lambda i: (-score[i], i))[:n]))

    def after_first(self) -> DraftProposal:
        """What this proposal drafts past its first token (a tree: the first node's subtree, its children now
        children of the context): the proposal for the context extended by that token."""
        if not self.tokens:
            return DraftProposal()
        if self.parents is None:
            return DraftProposal(self.tokens[1:], None if self.probs is None else self.probs[1:],
                                 None if self.confidence is None else self.confidence[1:])
        below = {0}
        for i, p in enumerate(self.parents):
            if p in below:
                below.add(i)
        sub = self._subtree(sorted(below))  # node 0 is the subtree's root: drop it, its children become roots
        return DraftProposal(sub.tokens[1:], None, None if sub.confidence is None else sub.confidence[1:],
                             [p - 1 for p in sub.parents[1:]])

    def main_chain(self) -> DraftProposal:
        """A tree's first branch (each node's first child, from the root) as a chain, for paths that verify
        chains only (the disaggregated token stream)."""
        if not self.is_tree:
            return DraftProposal(self.tokens, self.probs, self.confidence)
        idx, want = [], -1
        for i, p in enumerate(self.parents):
            if p == want:
                idx.append(i)
                want = i
        return DraftProposal([self.tokens[i] for i in idx], None,
                             None if self.confidence is None else [self.confidence[i] for i in idx])


class Drafter(ABC):
    """Proposes draft tokens for a batch of sequences."""

    #: Target layers whose hidden states this drafter reads (empty for drafters that need none).
    feature_layers: tuple[int, ...] = ()

    def add_sequence(self, seq_id: str, params: SamplingParams) -> None:
        """A new sequence starts; its context arrives with the first `propose`."""

    def release(self, seq_id: str) -> None:
        """The sequence finished, was cancelled or its client went away: free its state."""

    def observe_target_features(self, seq_id: str, start: int, hidden: torch.Tensor) -> None:
        """Target hidden states for positions [start, start + n) of the sequence.  hidden: [n, len(feature_layers) * d]"""

    @abstractmethod
    def propose(self, requests: list[DraftRequest]) -> list[DraftProposal]:
        """One proposal per request, in order. Must never raise on an unknown or empty context: return no tokens."""
