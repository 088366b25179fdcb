"""What a learned drafter is trained to do, as one module (so torch DDP can wrap it).

For a batch of sequences (prompt + the target's own answer) and the target's features:
- every drafter: the context stream's output at t predicts token t + 2 (cross-entropy over the draft vocabulary,
  on answer tokens);
- eagle and dspark: for A random anchors per sequence, the K block positions after each anchor are drafted the
  way serving drafts them (eagle: a chain fed with its own outputs; dspark: mask embeddings in one parallel pass,
  then the Markov head with the previous token teacher-forced) and scored with weights decaying with position;
- dspark also: total variation to the target's distribution (renormalised on the draft vocabulary) and binary
  cross-entropy for the confidence head, whose label is whether the drafted token is right, on the positions
  whose earlier positions are all right (the ones verification judges: `judged_positions`).
Besides the loss it returns the numbers the trainer reports: top-1 agreement at each position and the greedy
acceptance length a block would get (1 + the expected number of leading correct positions; exact for greedy
verification, since position i is drafted from the same inputs the test uses whenever the positions before it
were right).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.drafters.head import DraftHead


class DraftObjective(nn.Module):
    def __init__(self, head: DraftHead, anchors_per_seq: int = 16, decay: float = 0.8, tv_weight: float = 1.0,
                 confidence_weight: float = 0.1):
        super().__init__()
        self.head = head
        self.anchors_per_seq = anchors_per_seq
        self.decay = decay
        self.tv_weight = tv_weight
        self.confidence_weight = confidence_weight
        vocab = head.draft_vocab
        lookup = torch.full((head.cfg.vocab_size,), -100, dtype=torch.long)
        lookup[vocab.cpu()] = torch.arange(len(vocab))
        self.register_buffer("to_draft", lookup.to(vocab.device), persistent=False)  # [V] token -> draft index

    def forward(self, tokens, lengths, prompt_lens, features, last_hidden=None, target_logp=None,
                generator=None) -> dict:
        """tokens: [B, T]; lengths, prompt_lens: [B]; features: [B, T, F]; last_hidden: [B, T, d] the target's
        last layer, turned into its log-distribution over the draft vocabulary by target_logp (dspark's TV)."""
        head, cfg = self.head, self.head.cfg
        B, T = tokens.shape
        dev = tokens.device
        pos = torch.arange(T, device=dev)
        # the context stream over positions 0 .. T-2 (position t reads features at t and the token at t + 1)
        ctx, kvs = head.context(head.context_inputs(features[:, : T - 1], tokens[:, 1:]))  # [B, T-1, d]
        labels = self.to_draft[tokens]  # [B, T] draft-vocabulary index of each token, -100 outside it
        answer = (pos[None] >= prompt_lens[:, None]) & (pos[None] < lengths[:, None])  # [B, T] predictable tokens
        lab0 = labels[:, 2:].masked_fill(~answer[:, 2:], -100)  # ctx[:, t] predicts token t + 2
        logits0 = head.logits(ctx[:, : T - 2])
        loss = F.cross_entropy(logits0.flatten(0, 1), lab0.flatten(), ignore_index=-100)
        stats = {"loss0": loss.detach(), "acc0": _acc(logits0, lab0, answer[:, 2:])}
        K = cfg.block_size
        if K == 1:
            stats["sim_tau"] = 1 + stats["acc0"]
            stats["loss"] = loss
            return stats
        # anchors a: the first block token (a + 2) is an answer token
        lo = (prompt_lens - 2).clamp(min=0)
        hi = lengths - 3  # a + 2 <= length - 1
        A = self.anchors_per_seq
        r = torch.rand(B, A, device=dev, generator=generator)
        anchors = (lo[:, None] + (r * (hi - lo + 1).clamp(min=1)[:, None]).long()).clamp(max=T - 3)
        row_ok = (hi >= lo)[:, None].expand(B, A)
        idx = anchors[..., None] + 2 + torch.arange(K, device=dev)  # [B, A, K] token each block position predicts
        valid = (idx < lengths[:, None, None]) & row_ok[..., None]
        idx_c = idx.clamp(max=T - 1)
        blabels = labels.gather(1, idx_c.flatten(1)).view(B, A, K).masked_fill(~valid, -100)
        prev = tokens.gather(1, (idx_c - 1).flatten(1)).view(B, A, K)  # the token before each predicted one
        o0 = ctx.gather(1, anchors[..., None].expand(B, A, ctx.shape[-1]))  # [B, A, d] the anchor's output
        if cfg.kind == "dspark":
            blk = head.block(head.mask_embed[: K - 1].expand(B, A, K - 1, -1), kvs, anchors)
            o = torch.cat([o0[:, :, None], blk], dim=2)  # [B, A, K, d]
            z = torch.cat([o[:, :, :1], head.markov(o[:, :, 1:], prev[:, :, 1:])], dim=2)
        else:  # eagle: the chain, each step fed the previous step's output and token
            outs = [o0]
            inputs = []
            for i in range(1, K):
                inputs.append(head.chain_inputs(outs[-1], prev[:, :, i]))
                outs.append(head.block(torch.stack(inputs, dim=2), kvs, anchors)[:, :, -1])
            z = torch.stack(outs, dim=2)
        logits = head.logits(z)  # [B, A, K, Vd]
        w = self.decay ** torch.arange(K, device=dev, dtype=torch.float32)
        ce = F.cross_entropy(logits.flatten(0, 2), blabels.flatten(), ignore_index=-100, reduction="none")
        ce = ce.view(B, A, K)
        n_valid = valid.float().sum((0, 1)).clamp(min=1)
        block_loss = ((ce * valid).sum((0, 1)) / n_valid * w).sum() / w.sum()
        loss = loss + block_loss
        correct = (logits.argmax(-1) == blabels) & valid  # [B, A, K]
        if cfg.kind == "dspark":
            logp = logits.log_softmax(-1)
            if target_logp is not None and self.tv_weight > 0:
                h = last_hidden.gather(1, (idx_c - 1).flatten(1)[..., None].expand(-1, -1, last_hidden.shape[-1]))
                tgt = target_logp(h).view(B, A, K, -1)  # the target's distribution for each block position
                tv = 0.5 * (logp.exp() - tgt.exp()).abs().sum(-1)  # [B, A, K]
                tv_loss = ((tv * valid).sum((0, 1)) / n_valid * w).sum() / w.sum()
                loss = loss + self.tv_weight * tv_loss
                stats["tv"] = tv_loss.detach()
            max_prob = head.logits(o).softmax(-1).amax(-1)  # [B, A, K] confidence of the parallel guess
            conf_logit = head.confidence_logit(z, max_prob)
            judged = judged_positions(correct, valid)
            bce = F.binary_cross_entropy_with_logits(conf_logit, correct.float(), reduction="none")
            loss = loss + self.confidence_weight * (bce * judged).sum() / judged.sum().clamp(min=1)
            stats["conf"] = torch.sigmoid(conf_logit.detach())
        stats["loss"] = loss
        stats["correct"] = correct.detach()
        stats["valid"] = valid.detach()
        per_pos = correct.float().sum((0, 1)) / n_valid
        stats["acc_per_pos"] = per_pos.detach()
        # greedy acceptance length on full blocks: leading run of correct positions
        full = valid.all(-1)
        run = correct.long().cumprod(-1).sum(-1).float()  # [B, A]
        stats["sim_tau"] = 1 + (run * full).sum() / full.sum().clamp(min=1)
        return stats


def judged_positions(correct: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[..., K] bool: the block positions verification would judge, those whose earlier positions are all right.

    The confidence head learns on these only, so that it predicts P(position i accepted | positions before it
    accepted): serving multiplies these along the block into the predicted survival its draft-length bar reads
    (`min_confidence`). Trained on every position instead, it learned the unconditional rate and came out
    under-confident on the positions that matter (right answers cluster: a block that got position 1 right is an
    easy one).
    """
    before_ok = torch.cat([torch.ones_like(correct[..., :1]), correct[..., :-1].long().cumprod(-1).bool()], dim=-1)
    return valid & before_ok


def _acc(logits: torch.Tensor, labels: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Top-1 agreement over the counted positions (tokens outside the draft vocabulary count as misses)."""
    hit = (logits.argmax(-1) == labels) & (labels != -100) & counted
    return hit.sum() / counted.sum().clamp(min=1)
