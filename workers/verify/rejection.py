"""Lossless speculative sampling: verify sampled draft tokens so the output follows the target distribution.

The algorithm is the modified rejection sampling of Leviathan, Kalman & Matias, "Fast Inference from Transformers
via Speculative Decoding" (arXiv:2211.17192), and Chen et al., "Accelerating Large Language Model Decoding with
Speculative Sampling" (arXiv:2302.01318). With q_i the draft's distribution and p_i the target's at position i:

  * accept draft token x_i with probability min(1, p_i(x_i) / q_i(x_i)), i.e. iff u_i * q_i(x_i) < p_i(x_i) for
    u_i ~ U[0, 1), stopping at the first rejection;
  * at the first rejected position j, emit a token from norm(max(p_j - q_j, 0));
  * if all num_draft tokens were accepted, emit a bonus token from p_{num_draft}.

Each emitted token then follows p exactly, whatever q is. A point-mass draft (n-gram / prompt-lookup drafters,
greedy draft models; `draft_probs=None`) is the special case q = one-hot(x): accept with probability p(x), and the
residual is p with x removed, so no [B, K, V] one-hot is ever built. This stays lossless even when the proposed
tokens are chosen by any rule that does not look at the verifier's random draws. Rows of `draft_probs` that are
one-hot need no special path: the general formulas reduce to the same thing.

The whole batch is verified at once: acceptance is a cumulative product over positions, and the one token that
is sampled per row (correction or bonus) is drawn from a single [B, V] distribution gathered at num_accepted.
Seeded requests draw their uniforms and their sampling noise from their own generator, in an amount that depends
only on their own num_draft, so their output does not depend on the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workers.verify.sampling import sample_from_probs

# Below this residual mass, norm(max(p - q, 0)) is rounding noise rather than a distribution; a rejection is then
# (almost) impossible and we sample from p instead. The total variation distance equals the residual mass, so the
# error this introduces is bounded by it.
_MIN_RESIDUAL_MASS = 1e-6


def rejection_verify(
    draft_tokens: torch.Tensor,  # [B, K] long; entries at or past num_draft[b] are padding
    num_draft: torch.Tensor,  # [B] long in [0, K]
    draft_probs: torch.Tensor | None,  # [B, K, V] filtered draft distributions, or None for point-mass drafts
    target_probs: torch.Tensor,  # [B, K + 1, V] filtered target distributions
    generators: Sequence[torch.Generator | None] | None = None,  # B entries; None entries use the default RNG
) -> tuple[torch.Tensor, torch.Tensor]:  # output_tokens [B, K + 1] long (-1 past num_accepted), num_accepted [B]
    """Return (output_tokens, num_accepted): row b emits output_tokens[b, :num_accepted[b] + 1]."""
    batch, k = draft_tokens.shape
    if target_probs.dim() != 3 or target_probs.shape[:2] != (batch, k + 1):
        raise ValueError(f"target_probs must be [{batch}, {k + 1}, V], got shape {tuple(target_probs.shape)}")
    vocab = target_probs.shape[2]
    if draft_probs is not None and draft_probs.shape != (batch, k, vocab):
        raise ValueError(f"draft_probs must be [{batch}, {k}, {vocab}], got shape {tuple(draft_probs.shape)}")
    if generators is not None and len(generators) != batch:
        raise ValueError(f"need one generator (or None) per row: {len(generators)} for {batch} rows")
    device = target_probs.device

    draft_tokens = draft_tokens.to(device)
    num_draft = num_draft.to(device).clamp(0, k)
    tokens = draft_tokens.clamp(0, vocab - 1)  # padding may be -1; it is masked out below

    # Acceptance test at every proposed position.
    p_of_draft = target_probs[:, :k].gather(2, tokens.unsqueeze(2)).squeeze(2).float()  # [B, K]
    if draft_probs is None:
        q_of_draft = torch.ones_like(p_of_draft)  # [B, K]
    else:
        q_of_draft = draft_probs.gather(2, tokens.unsqueeze(2)).squeeze(2).float()  # [B, K]
    uniform = _uniforms(batch, k, num_draft, generators, device)  # [B, K]
    valid = torch.arange(k, device=device).unsqueeze(0) < num_draft.unsqueeze(1)  # [B, K]
    accepted = valid & (uniform * q_of_draft < p_of_draft)  # [B, K]
    num_accepted = accepted.long().cumprod(dim=1).sum(dim=1)  # [B] length of the accepted prefix

    # One more token per row, from the residual at the first rejection or from p after full acceptance.
    rows = torch.arange(batch, device=device)
    p_next = target_probs[rows, num_accepted].float()  # [B, V]
    if k > 0:
        rejected = num_accepted < num_draft  # [B]
        at = num_accepted.clamp(max=k - 1)  # [B] the rejected position (clamped for rows with no rejection)
        if draft_probs is None:
            residual = p_next.scatter(1, tokens[rows, at].unsqueeze(1), 0.0)  # [B, V] max(p - one_hot(x), 0)
        else:
            residual = (p_next - draft_probs[rows, at].float()).clamp_min(0.0)  # [B, V]
        residual = torch.where(rejected.unsqueeze(1), residual, p_next)
    else:
        residual = p_next
    mass = residual.sum(dim=1, keepdim=True)  # [B, 1]
    next_probs = torch.where(mass > _MIN_RESIDUAL_MASS, residual / mass.clamp_min(_MIN_RESIDUAL_MASS), p_next)
    next_token = sample_from_probs(next_probs, generators)  # [B]

    cols = torch.arange(k + 1, device=device).unsqueeze(0)  # [1, K + 1]
    padded = torch.cat([draft_tokens, draft_tokens.new_full((batch, 1), -1)], dim=1)  # [B, K + 1]
    output_tokens = torch.where(cols < num_accepted.unsqueeze(1), padded, torch.full_like(padded, -1))
    output_tokens.scatter_(1, num_accepted.unsqueeze(1), next_token.unsqueeze(1))
    return output_tokens, num_accepted


def _uniforms(
    batch: int,
    k: int,
    num_draft: torch.Tensor,  # [B] long in [0, K]
    generators: Sequence[torch.Generator | None] | None,
    device: torch.device,
) -> torch.Tensor:  # [B, K] float32 in [0, 1)
    uniform = torch.rand(batch, k, device=device)
    if generators is None or all(gen is None for gen in generators):
        return uniform
    # Deliberate host sync, only when the batch has seeded requests: a seeded row draws exactly num_draft[b]
    # uniforms, so its random stream does not depend on the padded width K set by the other rows.
    counts = num_draft.tolist()
    for row, gen in enumerate(generators):
        if gen is not None and counts[row] > 0:
            uniform[row, : counts[row]] = torch.rand(counts[row], generator=gen, device=device)
    return uniform
