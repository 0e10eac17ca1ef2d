"""Fixtures shared by the tests (builders for spawned workers: ``builders.py``)."""

import pytest
import torch
from builders import shared_data_dir

from mupp.lab.grid import expand_point


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def datasets_dir():
    """``../shared/datasets`` (or ``$MUPP_TEST_DATA``) where it holds CIFAR-10, else None: the
    tests that read real data fall back to synthetic data there."""
    return shared_data_dir()


def _sweep_record(setting, width, lr, rho, acc, seed=0, *, diverged=False, exact=None, loss=None):
    """A finished run's record as a sweep stores it, for ``setting`` (the grid's
    ``PARAMETERIZATION[/VARIANT[/RULE[/PLAN]]]``) with best test accuracy ``acc`` (and, for
    a language model, best validation loss ``loss``)."""
    point = {"setting": setting, "width": width, "lr": lr, "rho": rho, "seed": seed}
    result = {"config": expand_point(point), "best_test_acc": acc, "diverged": diverged}
    if exact is not None:
        result["test_acc_exact"] = exact
    if loss is not None:
        result["best_test_loss"] = loss
    return {"params": {}, "result": result}


@pytest.fixture
def sweep_record():
    """The factory of hand-made run records (:func:`_sweep_record`)."""
    return _sweep_record


@pytest.fixture
def known_study():
    """μP² at widths 64 and 1024, 3 seeds, cells (lr, rho) with known per-seed accuracies:
    the optimum, its tie and the transfer regret are worked out in the tests."""
    table = {
        64: {
            (0.1, 0.0): (0.40, 0.41, 0.42),
            (0.1, 0.2): (0.50, 0.52, 0.54),  # best
            (0.2, 0.2): (0.49, 0.53, 0.52),  # tied with the best
            (0.2, 0.0): (0.30, 0.31, 0.32),
        },
        1024: {
            (0.1, 0.0): (0.45, 0.46, 0.47),
            (0.1, 0.2): (0.50, 0.51, 0.52),  # the small width's optimum
            (0.2, 0.2): (0.60, 0.62, 0.64),  # best, clearly
            (0.2, 0.0): (0.46, 0.46, 0.46),
        },
    }
    return [
        _sweep_record("mupp", w, lr, rho, a, s)
        for w, cells in table.items()
        for (lr, rho), accs in cells.items()
        for s, a in enumerate(accs)
    ]
