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
