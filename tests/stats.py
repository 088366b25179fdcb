"""Statistics shared by the statistical tests (rejection sampler, engine sampling)."""

from __future__ import annotations

import torch


def chi_square_pvalue(
    observed: torch.Tensor,  # [C] counts
    probs: torch.Tensor,  # [C] the hypothesised distribution (need not be normalised)
) -> float:
    """Goodness-of-fit p-value; cells expected to hold fewer than 5 counts are pooled into one. A count in a cell of
    probability 0 gives p = 0 (the sample cannot come from the distribution)."""
    observed, probs = observed.double(), probs.double() / probs.double().sum()
    impossible = probs <= 0
    if float(observed[impossible].sum()) > 0:
        return 0.0
    expected = probs[~impossible] * observed.sum()
    observed = observed[~impossible]
    small = expected < 5
    if bool(small.any()):
        expected = torch.cat([expected[~small], expected[small].sum().view(1)])
        observed = torch.cat([observed[~small], observed[small].sum().view(1)])
    df = expected.numel() - 1
    if df == 0:
        return 1.0
    stat = float(((observed - expected) ** 2 / expected).sum())
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))
