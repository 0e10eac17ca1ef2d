"""Fixtures shared by the tests (builders for spawned workers: ``builders.py``)."""

import pytest
import torch
from builders import shared_data_dir


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def datasets_dir():
    """``../shared/datasets`` (or ``$MUPP_TEST_DATA``) where it holds CIFAR-10, else None: the
    tests that read real data fall back to synthetic data there."""
    return shared_data_dir()
