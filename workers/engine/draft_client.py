"""How the target side of the engine reaches the draft side.

`DraftClient` is the small interface the engine loop talks to; `InProcessDraftClient` calls a `Drafter` directly
(tests, the offline bench, `specray generate`). The cluster supplies a remote client that keeps one gRPC stream
to a draft worker which drafts ahead of verification; the engine loop is the same either way.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

import torch

from workers.drafters.base import DraftProposal, DraftRequest, Drafter
from workers.params import SamplingParams


class DraftClient(ABC):
    #: target layers whose hidden states the drafter wants with each verdict
    feature_layers: tuple[int, ...] = ()

    @abstractmethod
    def start(self, seq_id: str, params: SamplingParams) -> None: ...

    @abstractmethod
    def drafts(self, requests: list[DraftRequest]) -> list[DraftProposal]:
        """Fresh draft tokens continuing each request's context (fewer than k, or none, is always allowed)."""

    def verdict(self, seq_id: str, token_ids: list[int], num_new: int, feature_start: int,
                hidden: torch.Tensor | None) -> None:
        """After prefill or a verification step: `token_ids` is the sequence's whole committed context (prompt +
        output), of which the last `num_new` tokens were committed by this step. `hidden` ([n, F], when the
        drafter asked for features) holds the target's hidden states at positions feature_start .. + n: the state
        at position q has read token q and predicts token q + 1."""

    @abstractmethod
    def finish(self, seq_id: str) -> None: ...

    def close(self) -> None:
        pass


class InProcessDraftClient(DraftClient):
    def __init__(self, drafter: Drafter):
        self.drafter = drafter
        self.feature_layers = tuple(drafter.feature_layers)
        self.draft_seconds = 0.0  # time spent drafting, for the bench

    def start(self, seq_id: str, params: SamplingParams) -> None:
        self.drafter.add_sequence(seq_id, params)

    def drafts(self, requests: list[DraftRequest]) -> list[DraftProposal]:
        t = time.perf_counter()
        out = self.drafter.propose(requests)
        self.draft_seconds += time.perf_counter() - t
        return out

    def verdict(self, seq_id, token_ids, num_new, feature_start, hidden) -> None:
        if hidden is not None:
            self.drafter.observe_target_features(seq_id, feature_start, hidden)

    def finish(self, seq_id: str) -> None:
        self.drafter.release(seq_id)
