"""From logits to the distribution a request samples from, and one exact sample from it.

Rejection sampling is lossless only with respect to the distributions it is handed: the emitted tokens follow the
target distribution *as filtered*. So the draft and the target logits must go through the same function with the
same parameters, and that function is `filter_logits_to_probs`. Filters apply in the order temperature -> top-k ->
top-p, with top-p measured on the distribution left after top-k (the order of HF transformers' default warpers and
of vLLM), and ties are broken by a stable sort so that exactly k tokens survive top-k.

`sample_from_probs` uses the exponential race, argmax_i p_i / E_i with E_i ~ Exp(1) i.i.d., which picks i with
probability p_i / sum(p) exactly (it is the Gumbel-max trick in another form) and, unlike `torch.multinomial`, needs
no host sync and no normalisation. A seeded request draws its noise from its own `torch.Generator`, so its sample
depends only on its own row and generator state, never on which other requests share the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def filter_logits_to_probs(
    logits: torch.Tensor,  # [N, V] any float dtype; computed in float32
    temperature: torch.Tensor,  # [N] float; 0 means greedy
    top_k: torch.Tensor,  # [N] long; 0 (or >= V) means off
    top_p: torch.Tensor,  # [N] float in (0, 1]; 1.0 means off
) -> torch.Tensor:  # [N, V] float32, rows sum to 1
    """Apply temperature, top-k and top-p to each row and return its probabilities.

    Greedy rows (temperature <= 0) come back as a one-hot on the argmax of the raw logits (first index on ties,
    matching `greedy_verify`).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    n, vocab = logits.shape
    for name, t in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        if t.shape != (n,):
            raise ValueError(f"{name} must be [{n}], got shape {tuple(t.shape)}")

    k = top_k.to(torch.long)
    k = torch.where((k <= 0) | (k > vocab), torch.full_like(k, vocab), k)
    # Deliberate host sync when top_k / top_p live on the accelerator: it lets the common unfiltered batch skip a
    # full-vocabulary sort. Callers build these tensors from SamplingParams on the host, where this check is free.
    needs_filter = bool(((k < vocab) | (top_p < 1.0)).any())

    device = logits.device
    logits = logits.float()
    temperature = temperature.to(device=device, dtype=torch.float32)
    greedy = temperature <= 0  # [N]
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(1)  # [N, V]
    if needs_filter:
        scaled = _mask_top_k_top_p(scaled, k.to(device), top_p.to(device=device, dtype=torch.float32))
    probs = torch.softmax(scaled, dim=-1)  # [N, V]

    one_hot = torch.zeros_like(probs).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)  # [N, V]
    return torch.where(greedy.unsqueeze(1), one_hot, probs)


def _mask_top_k_top_p(
    scaled: torch.Tensor,  # [N, V] float32 logits after temperature
    k: torch.Tensor,  # [N] long in [1, V]
    top_p: torch.Tensor,  # [N] float32
) -> torch.Tensor:  # [N, V] with filtered-out entries set to -inf
    n, vocab = scaled.shape
    sorted_logits, sorted_idx = scaled.sort(dim=-1, descending=True, stable=True)  # [N, V] each
    rank = torch.arange(vocab, device=scaled.device)  # [V]
    keep = rank.unsqueeze(0) < k.unsqueeze(1)  # [N, V] in sorted order

    # Nucleus over the top-k survivors: keep a token iff the mass strictly before it is still below top_p, which
    # is the smallest prefix whose mass reaches top_p. The top token is always kept.
    sorted_probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)  # [N, V]
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # [N, V]
    in_nucleus = (mass_before < top_p.unsqueeze(1)) | (top_p.unsqueeze(1) >= 1.0)
    keep &= in_nucleus
    keep[:, 0] = True

    keep_by_token = torch.empty_like(keep).scatter_(1, sorted_idx, keep)  # [N, V] back in vocabulary order
    return scaled.masked_fill(~keep_by_token, float("-inf"))


def sample_from_probs(
    probs: torch.Tensor,  # [N, V] non-negative weights; need not be normalised
    generators: Sequence[torch.Generator | None] | None = None,  # N entries; None entries use the default RNG
) -> torch.Tensor:  # [N] long
    """Draw one token per row, row i with probability proportional to probs[i].

    A row with a generator draws its V exponentials from that generator (which must live on probs' device); all
    other rows share one draw from the default RNG. A row whose weights are all zero returns token 0.
    """
    if probs.dim() != 2:
        raise ValueError(f"probs must be [N, V], got shape {tuple(probs.shape)}")
    n = probs.shape[0]
    probs = probs.float()
    noise = torch.empty_like(probs).exponential_()  # [N, V]
    if generators is not None:
        if len(generators) != n:
            raise ValueError(f"need one generator (or None) per row: {len(generators)} for {n} rows")
        for row, gen in enumerate(generators):
            if gen is not None:
                noise[row].exponential_(generator=gen)
    # A float32 exponential draw can round to 0; clamping keeps p / E finite (and 0 / E at 0) for p <= 1.
    noise.clamp_min_(torch.finfo(torch.float32).tiny)
    return (probs / noise).argmax(dim=-1)
