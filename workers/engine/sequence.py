"""One request's state inside the engine: tokens, sampling, stop conditions and speculation counters."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from workers.params import SamplingParams


class FinishReason(str, Enum):
    STOP = "stop"  # EOS token or stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # cancelled or the client went away


@dataclass
class Request:
    seq_id: str
    prompt_ids: list[int]
    max_tokens: int = 128
    params: SamplingParams = field(default_factory=SamplingParams)
    num_draft_tokens: int = 4  # k: draft tokens verified per step (0 = target only)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class Sequence:
    request: Request
    slot: int = -1
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_text_end: int | None = None  # where the output text is cut when a stop string matched
    generator: torch.Generator | None = None
    # speculation counters (vLLM's names)
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)
    num_steps: int = 0
    arrival_s: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    finish_s: float | None = None

    @property
    def seq_id(self) -> str:
        return self.request.seq_id

    @property
    def token_ids(self) -> list[int]:
        return self.request.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def tau(self) -> float:
        """Acceptance length: tokens emitted per verification step, bonus included (1 + accepted / drafts)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    def count_step(self, num_draft: int, num_accepted: int) -> None:
        self.num_steps += 1
        if num_draft == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_pos) < num_draft:
            self.accepted_per_pos += [0] * (num_draft - len(self.accepted_per_pos))
        for i in range(num_accepted):
            self.accepted_per_pos[i] += 1
