"""Verify one block of draft tokens for a batch that mixes greedy and sampled requests.

This is the entry point the engine calls after the target's forward pass over [last committed token, drafts].
Greedy rows (temperature == 0) need only the argmax of the target logits (`greedy_verify`); sampled rows turn the
target logits into filtered probabilities with the request's temperature / top-k / top-p (`filter_logits_to_probs`,
the same function the drafter applied to its own logits) and go through lossless rejection sampling
(`rejection_verify`). The batch is split by row, each part is verified with its own rule, and the results are
scattered back in the original row order, so a caller never has to group requests by sampling mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workers.verify.greedy import greedy_verify
from workers.verify.rejection import rejection_verify
from workers.verify.sampling import filter_logits_to_probs


@dataclass
class VerifyResult:
    # [B, K + 1] long: row b emits output_tokens[b, : num_accepted[b] + 1] (accepted drafts, then one token sampled
    # by the target); later entries are -1.
    output_tokens: torch.Tensor
    num_accepted: torch.Tensor  # [B] long in [0, num_draft[b]]


def verify_block(
    draft_tokens: torch.Tensor,  # [B, K] long; entries at or past num_draft[b] are padding
    num_draft: torch.Tensor,  # [B] long in [0, K]
    target_logits: torch.Tensor,  # [B, K + 1, V]
    draft_probs: torch.Tensor | None,  # [B, K, V] already filtered with the same params, or None for point masses
    temperature: torch.Tensor,  # [B] float; 0 means greedy
    top_k: torch.Tensor,  # [B] long; 0 means off
    top_p: torch.Tensor,  # [B] float; 1.0 means off
    generators: Sequence[torch.Generator | None] | None = None,  # B entries; None entries use the default RNG
) -> VerifyResult:
    batch, k = draft_tokens.shape
    if target_logits.dim() != 3 or target_logits.shape[:2] != (batch, k + 1):
        raise ValueError(f"target_logits must be [{batch}, {k + 1}, V], got shape {tuple(target_logits.shape)}")
    vocab = target_logits.shape[2]

    # Deliberate host sync if temperature lives on the accelerator: splitting the batch by sampling mode needs the
    # row indices on the host (the generators are a host list anyway). Callers normally build it on the host.
    is_greedy = (temperature <= 0).tolist()
    greedy_rows = [row for row, g in enumerate(is_greedy) if g]
    sampled_rows = [row for row, g in enumerate(is_greedy) if not g]

    if not sampled_rows:
        return VerifyResult(*greedy_verify(draft_tokens, num_draft, target_logits))

    device = target_logits.device
    output_tokens = torch.full((batch, k + 1), -1, dtype=torch.long, device=device)
    num_accepted = torch.zeros(batch, dtype=torch.long, device=device)

    if greedy_rows:
        rows = torch.tensor(greedy_rows, dtype=torch.long)
        out, n = greedy_verify(_take(draft_tokens, rows), _take(num_draft, rows), _take(target_logits, rows))
        output_tokens[rows.to(device)] = out
        num_accepted[rows.to(device)] = n

    all_sampled = not greedy_rows
    rows = torch.tensor(sampled_rows, dtype=torch.long)

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t if all_sampled else _take(t, rows)

    s = len(sampled_rows)
    positions = k + 1
    target_probs = filter_logits_to_probs(
        pick(target_logits).reshape(s * positions, vocab),
        pick(temperature).repeat_interleave(positions),
        pick(top_k).repeat_interleave(positions),
        pick(top_p).repeat_interleave(positions),
    ).view(s, positions, vocab)  # [S, K + 1, V]
    out, n = rejection_verify(
        pick(draft_tokens),
        pick(num_draft),
        None if draft_probs is None else pick(draft_probs),
        target_probs,
        None if generators is None else [generators[row] for row in sampled_rows],
    )
    if all_sampled:
        return VerifyResult(out, n)
    output_tokens[rows.to(device)] = out
    num_accepted[rows.to(device)] = n
    return VerifyResult(output_tokens, num_accepted)


def _take(
    t: torch.Tensor,  # [B, ...]
    rows: torch.Tensor,  # [R] long, on the host
) -> torch.Tensor:  # [R, ...]
    return t[rows.to(t.device)]
