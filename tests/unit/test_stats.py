"""The chi-square helper the statistical tests rely on, against textbook values."""

import torch

from tests.stats import chi_square_pvalue


def test_chi_square_pvalue_known_values():
    # stat = (10^2 / 50) * 2 = 4.0 with df = 1 -> p = 0.0455
    assert abs(chi_square_pvalue(torch.tensor([60.0, 40.0]), torch.tensor([0.5, 0.5])) - 0.0455) < 1e-3
    assert chi_square_pvalue(torch.tensor([50.0, 50.0]), torch.tensor([0.5, 0.5])) == 1.0
    # a count where the distribution has no mass cannot come from it
    assert chi_square_pvalue(torch.tensor([1.0, 9.0]), torch.tensor([0.0, 1.0])) == 0.0
    # the survival function underneath: df = 10 at 18.307 is the textbook 5% point
    sf = torch.special.gammaincc(torch.tensor(5.0, dtype=torch.float64), torch.tensor(18.307 / 2, dtype=torch.float64))
    assert abs(float(sf) - 0.05) < 1e-4
