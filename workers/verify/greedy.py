"""Greedy verification: keep the draft tokens that agree with the target's argmax.

For a greedy request the target's output is a deterministic function of the prefix, so verification is a prefix
match: draft token i is accepted iff it equals argmax of the target logits at position i and all earlier draft
tokens were accepted. The token emitted after the accepted prefix is the target's argmax at that position, which
is both the correction after a mismatch and the bonus token after full acceptance. Because accepted draft tokens
equal the argmax, the whole output row is just the argmax row cut after num_accepted + 1 tokens.
"""

from __future__ import annotations

import torch


def greedy_verify(
    draft_tokens: torch.Tensor,  # [B, K] long; entries at or past num_draft[b] are padding
    num_draft: torch.Tensor,  # [B] long in [0, K]
    target_logits: torch.Tensor,  # [B, K + 1, V]
) -> tuple[torch.Tensor, torch.Tensor]:  # output_tokens [B, K + 1] long (-1 past num_accepted), num_accepted [B]
    """Return (output_tokens, num_accepted): row b emits output_tokens[b, :num_accepted[b] + 1]."""
    batch, k = draft_tokens.shape
    if target_logits.shape[:2] != (batch, k + 1):
        raise ValueError(f"target_logits must be [{batch}, {k + 1}, V], got shape {tuple(target_logits.shape)}")
    device = target_logits.device

    target_argmax = target_logits.argmax(dim=-1)  # [B, K + 1]; first index on ties, as filter_logits_to_probs
    num_draft = num_draft.to(device).clamp(0, k)
    valid = torch.arange(k, device=device).unsqueeze(0) < num_draft.unsqueeze(1)  # [B, K]
    matches = valid & (draft_tokens.to(device) == target_argmax[:, :k])  # [B, K]
    num_accepted = matches.long().cumprod(dim=1).sum(dim=1)  # [B] length of the all-match prefix

    cols = torch.arange(k + 1, device=device).unsqueeze(0)  # [1, K + 1]
    output_tokens = torch.where(cols <= num_accepted.unsqueeze(1), target_argmax, torch.full_like(target_argmax, -1))
    return output_tokens, num_accepted
