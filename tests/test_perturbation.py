"""``mupp.optim.perturbation.scales``: the normalization of every rule (Def. 4, Remark F.4,
Remark F.2, App. F.3), non-finite norms, and broadcasting over configurations."""

import math

import pytest
import torch

from mupp.choices import RULES
from mupp.optim.perturbation import scales

NORMS = torch.tensor([3.0, 4.0])  # t_l of two tensors
NUM = torch.tensor([2.0, 0.5])
DEN = torch.tensor([1.0, 0.5])
RHO = torch.tensor([0.1, 0.1])


def test_joint_normalization_lp_dp():
    for rule in ("LP", "DP"):
        s, finite = scales(rule, NORMS, NUM, DEN, RHO, 0.0)
        total = math.sqrt((1.0 * 3.0) ** 2 + (0.5 * 4.0) ** 2)  # sqrt(9 + 4)
        torch.testing.assert_close(s, 0.1 * NUM / total)
        assert bool(finite)


def test_layerwise_and_unnormalized():
    s, _ = scales("LN", NORMS, NUM, DEN, RHO, 0.0)
    torch.testing.assert_close(s, 0.1 * NUM / NORMS)
    s, _ = scales("unnormalized", NORMS, NUM, DEN, RHO)
    torch.testing.assert_close(s, 0.1 * NUM)


@pytest.mark.parametrize("rule", RULES)
def test_non_finite_norm_zeroes_every_scale(rule):
    s, finite = scales(rule, torch.tensor([3.0, float("nan")]), NUM, DEN, RHO)
    assert not bool(finite)
    assert torch.equal(s, torch.zeros(2))


def test_the_stabilizer_keeps_a_zero_gradient_finite():
    """With every gradient zero the scale is large but finite, so ε = s · 0 = 0 (no nan)."""
    s, finite = scales("LP", torch.zeros(2), NUM, DEN, RHO, 1e-12)
    assert bool(finite) and torch.isfinite(s).all()
    assert torch.equal(s * torch.zeros(2), torch.zeros(2))


@pytest.mark.parametrize("rule", RULES)
def test_configurations_are_independent_problems(rule):
    """Further dims of ``norms`` are separate problems (the vectorized sweeps): each column
    equals the single-problem result, and one non-finite column leaves the others alone."""
    norms = torch.tensor([[3.0, 1.0, 2.0], [4.0, float("inf"), 2.0]])
    rho = torch.tensor([0.1, 0.2, 0.4])  # per configuration, broadcast over tensors
    s, finite = scales(rule, norms, NUM[:, None], DEN[:, None], rho, 1e-12)
    assert s.shape == (2, 3) and finite.tolist() == [True, False, True]
    for k in (0, 2):
        one, _ = scales(rule, norms[:, k], NUM, DEN, rho[k].expand(2), 1e-12)
        torch.testing.assert_close(s[:, k], one)
    assert torch.equal(s[:, 1], torch.zeros(2))


def test_unknown_rule():
    with pytest.raises(ValueError, match="rule must be one of"):
        scales("LQ", NORMS, NUM, DEN, RHO)
