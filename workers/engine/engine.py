"""The speculative decoding loop with continuous batching.

    admit waiting requests (prefill, first token)  ->  for every running sequence ask the draft side for fresh
    draft tokens  ->  ONE batched target forward over [pending, drafts]  ->  verifier  ->  emit accepted tokens,
    stop checks, roll back the KV cache  ->  tell the draft side what was committed  ->  repeat

This is the loop a target worker runs in the cluster too: there the `DraftClient` is a gRPC stream to a draft
worker that drafts ahead of verification, here it can be a drafter in the same process. A sequence whose draft
side has nothing (k = 0, a slow or dead draft) is advanced by one target token through the same code, so output
never depends on the draft, only speed does.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from workers.drafters.base import DraftProposal, DraftRequest
from workers.engine.draft_client import DraftClient
from workers.engine.sequence import FinishReason, Request, Sequence
from workers.engine.target import StepResult, TargetRunner
from workers.models.decoder import ForwardOutput
from workers.models.loader import LoadedModel


@dataclass
class StepEvent:
    seq_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None


class SpecEngine:
    def __init__(
        self,
        target: LoadedModel,
        draft: DraftClient | None = None,
        max_batch: int = 8,
        max_model_len: int | None = None,
        max_draft_tokens: int = 16,
        forward: Callable[..., ForwardOutput] | None = None,  # runs the target forward (default: the model)
    ):
        self.target = target
        self.tokenizer = target.tokenizer
        self.draft = draft
        limit = target.model.args.max_position_embeddings
        self.max_model_len = min(max_model_len or 4096, limit)
        self.max_draft_tokens = max_draft_tokens
        self.runner = TargetRunner(target.model, max_batch, self.max_model_len, max_draft_tokens, forward)
        self.eos = set(target.eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.sequences: dict[str, Sequence] = {}
        self.fallback_steps = 0  # sequence-steps that verified no draft token although k > 0

    # --- requests ------------------------------------------------------------------------------------------------
    def add_request(self, request: Request) -> Sequence:
        if request.seq_id in self.sequences:
            raise ValueError(f"duplicate request id {request.seq_id!r}")
        self.validate(request)
        seq = Sequence(request)
        if not request.params.greedy:
            seq.generator = torch.Generator(device=self.target.model.device)  # draws on the logits' device
            seq.generator.manual_seed(request.params.seed if request.params.seed is not None
                                      else int(torch.randint(0, 2**62, ()).item()))
        self.sequences[request.seq_id] = seq
        self.waiting.append(seq)
        return seq

    def validate(self, request: Request) -> None:
        """Raise ValueError with a message a user can act on."""
        request.params.validate()
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if n + request.max_tokens > self.max_model_len:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has {n} tokens "
                f"and max_tokens is {request.max_tokens} ({n + request.max_tokens} in total)"
            )
        if not 0 <= request.num_draft_tokens <= self.max_draft_tokens:
            raise ValueError(f"num_draft_tokens must be in [0, {self.max_draft_tokens}], got "
                             f"{request.num_draft_tokens}")
        bad = [t for t in request.prompt_ids if not 0 <= t < self.runner.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {self.runner.vocab_size}): {bad[:5]}")

    def abort(self, seq_id: str) -> None:
        seq = self.sequences.get(seq_id)
        if seq is None or seq.finished:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.running = [s for s in self.running if s is not seq]
        self._finish(seq, FinishReason.ABORT)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- the loop ------------------------------------------------------------------------------------------------
    def step(self) -> list[StepEvent]:
        events: list[StepEvent] = []
        running = list(self.running)  # sequences admitted now start verifying next step
        admitted = []
        while self.waiting and self.runner.num_free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.runner.allocate()
            admitted.append(seq)
        layers = self.draft.feature_layers if self.draft else ()
        if admitted:
            for seq in admitted:
                if self.draft:
                    self.draft.start(seq.seq_id, seq.request.params)
            result = self.runner.prefill(admitted, layers)
            self.running += admitted
            self._commit(admitted, result, events)
        if running:
            proposals = self._drafts(running)
            result = self.runner.verify(running, proposals, layers)
            self._commit(running, result, events)
        self.running = [s for s in self.running if not s.finished]
        return events

    def _drafts(self, seqs: list[Sequence]) -> list[DraftProposal]:
        wants = [self._num_draft(s) for s in seqs]
        proposals = [DraftProposal() for _ in seqs]
        asked = [i for i, k in enumerate(wants) if k > 0]
        if self.draft and asked:
            got = self.draft.drafts([DraftRequest(seqs[i].seq_id, seqs[i].token_ids, wants[i]) for i in asked])
            for i, p in zip(asked, got):
                # never trust the draft side with the budget: at most k deep, and no more nodes than fit
                proposals[i] = p.within(wants[i], self.runner.max_draft_tokens)
        for i, k in enumerate(wants):
            if k > 0 and not proposals[i].tokens:
                self.fallback_steps += 1
        return proposals

    def _num_draft(self, seq: Sequence) -> int:
        """Verify budget for this step: the request's k, capped so the step cannot overshoot max_tokens or the
        context (a fixed k for now; the SLO-driven budget plugs in here)."""
        if self.draft is None:
            return 0
        left = seq.request.max_tokens - len(seq.output_ids) - 1
        room = self.max_model_len - len(seq.token_ids) - 1
        return max(0, min(seq.request.num_draft_tokens, left, room))

    def _commit(self, seqs: list[Sequence], result: StepResult, events: list[StepEvent]) -> None:
        now = time.perf_counter()
        for i, seq in enumerate(seqs):
            if seq.finished:  # aborted while the step ran
                continue
            seq.count_step(result.num_draft[i], result.num_accepted[i])
            start = len(seq.output_ids)
            for tok in result.emitted[i]:
                seq.output_ids.append(tok)
                reason = self._stop_reason(seq, tok)
                if reason is not None:
                    seq.finish_reason = reason
                    break
            if seq.first_token_s is None:
                seq.first_token_s = now
            if seq.request.stop:  # also when EOS or max_tokens ended the step: a stop string may come first
                self._check_stop_strings(seq, start)
            new = seq.output_ids[start:]
            if seq.finished:
                reason = seq.finish_reason
                seq.finish_reason = None
                self._finish(seq, reason)
            elif self.draft:
                self.draft.verdict(seq.seq_id, seq.token_ids, len(new), result.feature_start[i], result.hidden[i])
            events.append(StepEvent(seq.seq_id, new, seq.finished,
                                    seq.finish_reason.value if seq.finish_reason else None))

    def _stop_reason(self, seq: Sequence, tok: int) -> FinishReason | None:
        if tok in self.eos and not seq.request.ignore_eos:
            return FinishReason.STOP
        if len(seq.output_ids) >= seq.request.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _check_stop_strings(self, seq: Sequence, start: int) -> None:
        """Stop strings may end inside any token emitted this step: find the first token that completes one,
        drop the tokens after it, and remember where the text is cut."""
        longest = max(len(s) for s in seq.request.stop)
        for end in range(start + 1, len(seq.output_ids) + 1):
            text = self.tokenizer.decode(seq.output_ids[:end], skip_special_tokens=True)
            window = text[-(longest + 64):]
            offset = len(text) - len(window)
            hits = [offset + window.find(s) for s in seq.request.stop if s in window]
            if hits:
                del seq.output_ids[end:]
                seq.stop_text_end = min(hits)
                seq.finish_reason = FinishReason.STOP
                return

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish_reason = reason
        seq.finish_s = time.perf_counter()
        if seq.slot >= 0:
            self.runner.free(seq.slot)
            seq.slot = -1
        if self.draft:
            self.draft.finish(seq.seq_id)

    def release(self, seq_id: str) -> None:
        """Forget a finished sequence (the caller has read its output)."""
        seq = self.sequences.get(seq_id)
        if seq is not None and seq.finished:
            del self.sequences[seq_id]

    # --- convenience ---------------------------------------------------------------------------------------------
    def run(self, requests: list[Request]) -> list[Sequence]:
        """Run requests to completion (continuous batching up to max_batch) and return them in order."""
        seqs = [self.add_request(r) for r in requests]
        while self.has_work:
            self.step()
        for s in seqs:
            self.release(s.seq_id)
        return seqs

    def text(self, seq: Sequence) -> str:
        text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        return text[: seq.stop_text_end] if seq.stop_text_end is not None else text
