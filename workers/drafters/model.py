"""`model` drafter: an independent small LM that shares the target's tokenizer.

Each sequence gets a slot in the drafter's own KV cache and a record of the tokens that slot holds. A request
states the full context; the drafter keeps the longest common prefix of what it has cached and what it is asked
to continue, rolls the rest back, prefills the difference, then decodes k tokens autoregressively. All sequences
in a call share each forward pass (prefill rows padded, then one row per sequence per draft position).

Greedy requests draft by argmax; sampled requests sample from the draft distribution filtered with the request's
own temperature / top-k / top-p and return it, which the verifier needs for lossless rejection sampling.
"""

from __future__ import annotations

import torch

from workers.drafters.base import DraftProposal, DraftRequest, Drafter
from workers.models.loader import LoadedModel
from workers.params import SamplingParams
from workers.verify.sampling import filter_logits_to_probs, sample_from_probs


class _State:
    def __init__(self, slot: int, params: SamplingParams):
        self.slot = slot
        self.params = params
        self.cached: list[int] = []  # tokens whose keys/values are in the slot
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator()
            # an independent stream from the target's: drafts must not correlate with the verifier's draws
            self.generator.manual_seed((params.seed if params.seed is not None else torch.seed()) + 0x5EED)


class ModelDrafter(Drafter):
    def __init__(self, draft: LoadedModel, max_batch: int = 8, max_model_len: int = 4096, max_draft_tokens: int = 16):
        self.lm = draft
        self.model = draft.model
        self.cache = self.model.new_cache(max_batch, max_model_len + max_draft_tokens + 2)
        self.states: dict[str, _State] = {}

    def add_sequence(self, seq_id: str, params: SamplingParams) -> None:
        if seq_id in self.states or self.cache.num_free == 0:
            return  # no room: this sequence simply gets no drafts (the target falls back to k = 0)
        self.states[seq_id] = _State(self.cache.allocate(), params)

    def release(self, seq_id: str) -> None:
        st = self.states.pop(seq_id, None)
        if st is not None:
            self.cache.free(st.slot)

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[DraftProposal]:
        out = [DraftProposal() for _ in requests]
        rows = [i for i, r in enumerate(requests)
                if r.k > 0 and r.token_ids and r.seq_id in self.states
                and len(r.token_ids) + r.k + 1 < self.cache.capacity]
        if not rows:
            return out
        states = [self.states[requests[i].seq_id] for i in rows]
        # 1. repair each slot to the longest common prefix and feed what is new (at least the last token)
        feeds = []
        for i, st in zip(rows, states):
            ctx = requests[i].token_ids
            keep = _common_prefix(st.cached, ctx, limit=len(ctx) - 1)
            self.cache.rollback(st.slot, keep)
            st.cached = ctx[:keep]
            feeds.append(ctx[keep:])
        n = [len(f) for f in feeds]
        tokens = torch.zeros(len(rows), max(n), dtype=torch.long)
        for j, f in enumerate(feeds):
            tokens[j, : n[j]] = torch.tensor(f)
        logits = self.model(tokens, self.cache, [s.slot for s in states], num_new=n, logits="last").logits[:, 0]
        for st, f in zip(states, feeds):
            st.cached += f
        # 2. decode k tokens, one batched forward per draft position over the rows that still want more
        drafted: list[list[int]] = [[] for _ in rows]
        probs: list[list[torch.Tensor]] = [[] for _ in rows]
        active = list(range(len(rows)))
        while True:
            toks = self._pick([states[j] for j in active], logits, [probs[j] for j in active])
            for j, t in zip(active, toks):
                drafted[j].append(t)
            active = [j for j in active if len(drafted[j]) < requests[rows[j]].k]
            if not active:
                break
            step_in = torch.tensor([[drafted[j][-1]] for j in active])
            logits = self.model(step_in, self.cache, [states[j].slot for j in active]).logits[:, 0]
            for j in active:
                states[j].cached.append(drafted[j][-1])
        for j, i in enumerate(rows):
            p = torch.stack(probs[j]) if probs[j] else None
            out[i] = DraftProposal(drafted[j], p)
        return out

    def _pick(self, states: list[_State], logits: torch.Tensor, probs_out: list[list[torch.Tensor]]) -> list[int]:
        """logits: [B, V] -> one token per row; sampled rows also record their filtered distribution."""
        if all(s.params.greedy for s in states):
            return logits.argmax(-1).tolist()
        p = [s.params for s in states]
        probs = filter_logits_to_probs(
            logits,
            torch.tensor([x.temperature for x in p], dtype=torch.float32),
            torch.tensor([x.top_k for x in p], dtype=torch.long),
            torch.tensor([x.top_p for x in p], dtype=torch.float32),
        )
        toks = sample_from_probs(probs, [s.generator for s in states]).tolist()
        for row, s in enumerate(states):
            if not s.params.greedy:
                probs_out[row].append(probs[row])
        return toks


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
