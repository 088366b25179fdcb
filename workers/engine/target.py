"""The target side of one speculation step: prefill, one batched verification forward, the verifier, rollback.

`TargetRunner` owns the target model and its KV cache. For each running sequence the cache holds every token but
the last emitted one (the "pending" token). A step feeds [pending, d_1 .. d_k] for every sequence in one padded
forward pass, so k = 0 (no draft, the fallback) is the same code with a one-token row. After the verifier has
decided, each slot is rolled back to (old length + 1 + accepted): the pending token and the accepted drafts stay
cached, rejected positions are forgotten.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from workers.drafters.base import DraftProposal
from workers.engine.sequence import Sequence
from workers.models.decoder import Decoder, ForwardOutput
from workers.verify import verify_block
from workers.verify.sampling import filter_logits_to_probs, sample_from_probs


@dataclass
class StepResult:
    emitted: list[list[int]]  # per sequence: accepted draft tokens + the target's own token
    num_draft: list[int]  # per sequence: draft tokens verified this step
    num_accepted: list[int]
    feature_start: list[int]  # per sequence: position of the first committed position `hidden` covers
    hidden: list[torch.Tensor | None]  # per sequence: [committed positions, F] target features, or None


class TargetRunner:
    def __init__(self, model: Decoder, max_batch: int, max_model_len: int, max_draft_tokens: int = 16,
                 forward: Callable[..., ForwardOutput] | None = None):
        self.model = model
        # what runs a forward pass: the model itself, or a wrapper with its signature (a tensor-parallel leader,
        # workers/engine/tp_group.py, which first tells its followers to run the same step)
        self.forward = forward if forward is not None else model
        self.max_model_len = max_model_len
        self.max_draft_tokens = max_draft_tokens
        self.cache = model.new_cache(max_batch, max_model_len + max_draft_tokens + 1)
        self.vocab_size = model.args.vocab_size

    # --- slots -------------------------------------------------------------------------------------------------
    def allocate(self) -> int:
        return self.cache.allocate()

    def free(self, slot: int) -> None:
        self.cache.free(slot)

    @property
    def num_free_slots(self) -> int:
        return self.cache.num_free

    # --- sampling helpers ----------------------------------------------------------------------------------------
    @staticmethod
    def _params(seqs: list[Sequence]):
        p = [s.request.params for s in seqs]
        return (torch.tensor([x.temperature for x in p], dtype=torch.float32),
                torch.tensor([x.top_k for x in p], dtype=torch.long),
                torch.tensor([x.top_p for x in p], dtype=torch.float32))

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:  # logits: [B, V]
        temperature, top_k, top_p = self._params(seqs)
        if bool((temperature <= 0).all()):
            return logits.argmax(-1).tolist()  # host sync: the tokens go back to the caller
        probs = filter_logits_to_probs(logits, temperature, top_k, top_p)
        return sample_from_probs(probs, [s.generator for s in seqs]).tolist()

    # --- the two kinds of forward pass ---------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence], feature_layers: tuple[int, ...] = ()) -> StepResult:
        """Run the prompts, sample each sequence's first token."""
        lens = [len(s.request.prompt_ids) for s in seqs]
        T = max(lens)
        tokens = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, : lens[i]] = torch.tensor(s.request.prompt_ids)
        out = self.forward(tokens, self.cache, [s.slot for s in seqs], num_new=lens, logits="last",
                           hidden_layers=feature_layers)
        first = self._sample(seqs, out.logits[:, 0])
        hidden = [out.hidden[i, : lens[i]] if out.hidden is not None else None for i in range(len(seqs))]
        return StepResult([[t] for t in first], [0] * len(seqs), [0] * len(seqs), [0] * len(seqs), hidden)

    @torch.inference_mode()
    def verify(
        self, seqs: list[Sequence], proposals: list[DraftProposal], feature_layers: tuple[int, ...] = ()
    ) -> StepResult:
        """One batched forward over [pending token, draft tokens] for every sequence, then the verifier."""
        B = len(seqs)
        nd = [len(p.tokens) for p in proposals]
        K = max(nd)
        tokens = torch.zeros(B, K + 1, dtype=torch.long)
        for i, (s, p) in enumerate(zip(seqs, proposals)):
            tokens[i, 0] = s.output_ids[-1]
            if nd[i]:
                tokens[i, 1 : nd[i] + 1] = torch.tensor(p.tokens)
        slots = [s.slot for s in seqs]
        starts = [self.cache.lengths[x] for x in slots]
        out = self.forward(tokens, self.cache, slots, num_new=[n + 1 for n in nd], hidden_layers=feature_layers)
        temperature, top_k, top_p = self._params(seqs)
        draft_probs = self._draft_probs(proposals, temperature, K) if K else None
        result = verify_block(tokens[:, 1:], torch.tensor(nd), out.logits, draft_probs, temperature, top_k, top_p,
                              [s.generator for s in seqs])
        # one host sync per step: the accepted lengths decide what is emitted and where each slot rolls back to
        n_acc = result.num_accepted.tolist()
        out_tokens = result.output_tokens.tolist()
        emitted, hidden = [], []
        for i, slot in enumerate(slots):
            keep = starts[i] + 1 + n_acc[i]
            self.cache.rollback(slot, keep)
            emitted.append(out_tokens[i][: n_acc[i] + 1])
            hidden.append(out.hidden[i, : 1 + n_acc[i]] if out.hidden is not None else None)
        return StepResult(emitted, nd, n_acc, starts, hidden)

    def _draft_probs(self, proposals: list[DraftProposal], temperature: torch.Tensor, K: int) -> torch.Tensor | None:
        """[B, K, V] draft distributions for sampled rows; None when no sampled row exists or every draft is a
        point mass (the verifier then treats each draft token as one-hot)."""
        sampled = [i for i, t in enumerate(temperature.tolist()) if t > 0]
        if not sampled or all(proposals[i].probs is None for i in sampled):
            return None
        probs = torch.zeros(len(proposals), K, self.vocab_size)
        for i, p in enumerate(proposals):
            n = len(p.tokens)
            if n == 0:
                continue
            if p.probs is None:
                probs[i, torch.arange(n), torch.tensor(p.tokens)] = 1.0
            else:
                v = min(p.probs.shape[-1], self.vocab_size)
                probs[i, :n, :v] = p.probs[:n, :v].float()
        return probs
