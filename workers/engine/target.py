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
        """One batched forward over [pending token, draft tokens] for every sequence, then the verifier.

        A greedy row may bring a token tree (`DraftProposal.parents`): its nodes go through the same forward with
        a tree mask, the longest path the target agrees with is accepted, and that path's cache entries are moved
        into place. A sampled row verifies a chain (a tree is cut to its first branch), so rejection sampling sees
        exactly one draft distribution per position."""
        B = len(seqs)
        proposals = [p.main_chain() if p.is_tree and not s.request.params.greedy else p
                     for s, p in zip(seqs, proposals)]
        nd = [len(p.tokens) for p in proposals]
        K = max(nd)
        tokens = torch.zeros(B, K + 1, dtype=torch.long)
        for i, (s, p) in enumerate(zip(seqs, proposals)):
            tokens[i, 0] = s.output_ids[-1]
            if nd[i]:
                tokens[i, 1 : nd[i] + 1] = torch.tensor(p.tokens)
        slots = [s.slot for s in seqs]
        starts = [self.cache.lengths[x] for x in slots]
        is_tree = [p.is_tree for p in proposals]
        tree = None
        if any(is_tree):
            tree = torch.arange(-1, K).repeat(B, 1)  # [B, K + 1] parent of each row position; chains: t - 1
            for i, p in enumerate(proposals):
                if is_tree[i]:
                    tree[i, 1 : nd[i] + 1] = torch.tensor(p.parents) + 1  # row position 0 is the pending token
        out = self.forward(tokens, self.cache, slots, num_new=[n + 1 for n in nd], hidden_layers=feature_layers,
                           tree=tree)
        temperature, top_k, top_p = self._params(seqs)
        draft_probs = self._draft_probs(proposals, temperature, K) if K else None
        result = verify_block(tokens[:, 1:], torch.tensor(nd), out.logits, draft_probs, temperature, top_k, top_p,
                              [s.generator for s in seqs])
        # one host sync per step: the accepted lengths decide what is emitted and where each slot rolls back to
        n_acc = result.num_accepted.tolist()
        out_tokens = result.output_tokens.tolist()
        paths: dict[int, list[int]] = {}
        if tree is not None:  # greedy tree rows: walk down the tree along the target's argmax
            argmax = out.logits.argmax(-1).tolist()  # [B, K + 1]
            for i, p in enumerate(proposals):
                if is_tree[i]:
                    path = _accepted_path(p, argmax[i])  # row positions of the accepted nodes
                    paths[i] = path
                    n_acc[i] = len(path)
                    out_tokens[i] = [p.tokens[j - 1] for j in path] + [argmax[i][path[-1] if path else 0]]
        emitted, hidden = [], []
        for i, slot in enumerate(slots):
            keep = starts[i] + 1 + n_acc[i]
            rows = None
            if paths.get(i):
                rows = [0] + paths[i]
                self._compact(slot, starts[i], rows)
            self.cache.rollback(slot, keep)
            emitted.append(out_tokens[i][: n_acc[i] + 1])
            if out.hidden is None:
                hidden.append(None)
            else:
                hidden.append(out.hidden[i, rows] if rows is not None else out.hidden[i, : 1 + n_acc[i]])
        return StepResult(emitted, nd, n_acc, starts, hidden)

    def _compact(self, slot: int, start: int, rows: list[int]) -> None:
        compact = getattr(self.forward, "compact", None)  # a tensor-parallel leader moves its followers' too
        if compact is not None:
            compact(self.cache, slot, start, rows)
        else:
            self.cache.compact(slot, start, rows)

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
        return probs.to(self.model.device)


def _accepted_path(proposal: DraftProposal, argmax: list[int]) -> list[int]:
    """Greedy acceptance in a token tree: from the pending token (row position 0), follow the child whose token is
    the target's argmax at the current node, as long as one exists. Returns the row positions (node index + 1)."""
    children: dict[int, list[int]] = {}
    for j, parent in enumerate(proposal.parents):
        children.setdefault(parent + 1, []).append(j + 1)
    path, node = [], 0
    while True:
        nxt = next((c for c in children.get(node, ()) if proposal.tokens[c - 1] == argmax[node]), None)
        if nxt is None:
            return path
        path.append(nxt)
        node = nxt
