"""Vectorized groups equal sequential runs; grouping rules."""

import pytest

from mupp.lab import data
from mupp.lab.config import TrainConfig
from mupp.lab.train import train
from mupp.lab.vectorized import group_key, supports, train_group

DS = data.synthetic(384, 256, seed=3)
BASE = dict(
    dataset="synthetic",
    width=48,
    base_width=16,
    epochs=2,
    batch_size=64,
    momentum=0.9,
    weight_decay=1e-3,
)


@pytest.mark.parametrize(
    "extra",
    [
        dict(),
        dict(rule="DP", nesterov=True, schedule="cosine"),
        dict(rule="LN", parameterization="mup-global"),
        dict(variant="last-layer", model_kwargs={"bias": True}),
        dict(rule="unnormalized", parameterization="sp", label_smoothing=0.1),
        dict(variant="first-layer", rule="LN", momentum=0.0),
    ],
)
def test_group_equals_sequential_runs(extra):
    # stable settings: in a run that blows up, float summation order is amplified
    cfgs = [dict(BASE, **extra, lr=lr, rho=rho) for lr in (0.02, 0.05) for rho in (0.0, 0.05, 0.15)]
    vec = train_group([TrainConfig.from_dict(c) for c in cfgs], DS)
    for c, v in zip(cfgs, vec):
        s = train(TrainConfig.from_dict(c), progress=False, dataset=DS, log=None)
        assert v["config"] == s["config"]
        assert len(v["history"]) == len(s["history"])
        for a, b in zip(v["history"], s["history"]):
            for k in ("train_loss", "test_loss", "train_acc", "test_acc"):
                assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-5), (c, k)
        assert v["diverged"] == s["diverged"]


@pytest.mark.parametrize("extra", [dict(), dict(momentum=0.0, rule="DP")])
def test_a_group_of_several_seeds_equals_their_sequential_runs(extra):
    # each seed its own initialization and data order; seeds 0 and 2 share nothing
    cfgs = [
        dict(BASE, **extra, lr=0.05, rho=rho, seed=seed) for seed in (2, 0) for rho in (0.0, 0.1)
    ]
    vec = train_group([TrainConfig.from_dict(c) for c in cfgs], DS)
    for c, v in zip(cfgs, vec):
        s = train(TrainConfig.from_dict(c), progress=False, dataset=DS, log=None)
        assert v["config"] == s["config"]
        for a, b in zip(v["history"], s["history"], strict=True):
            for k in ("train_loss", "test_loss", "train_acc", "test_acc"):
                assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-5), (c, k)
    assert vec[0]["history"] != vec[2]["history"]  # the seeds differ


def test_grouping_rules():
    a = dict(BASE, lr=0.1, rho=0.1)
    assert group_key(TrainConfig.from_dict(a)) == group_key(
        TrainConfig.from_dict(dict(a, lr=0.2, rho=0.0))
    )
    assert group_key(TrainConfig.from_dict(a)) == group_key(
        TrainConfig.from_dict(dict(a, seed=1))
    )  # seeds train together too
    assert group_key(TrainConfig.from_dict(a)) != group_key(
        TrainConfig.from_dict(dict(a, width=64))
    )
    assert supports(TrainConfig.from_dict(a)) and not supports(
        TrainConfig.from_dict(dict(a, model="resnet8", width=16, base_width=16))
    )
    assert not supports(TrainConfig.from_dict(dict(a, variant="asam-elem")))
    with pytest.raises(ValueError, match="differ only in"):
        train_group([TrainConfig.from_dict(c) for c in [a, dict(a, width=64)]], DS)


def test_a_diverging_configuration_does_not_disturb_the_others():
    cfgs = [dict(BASE, lr=lr, rho=0.05) for lr in (0.05, 1e4)]
    vec = train_group([TrainConfig.from_dict(c) for c in cfgs], DS)
    seq = [train(TrainConfig.from_dict(c), progress=False, dataset=DS, log=None) for c in cfgs]
    assert [v["diverged"] for v in vec] == [s["diverged"] for s in seq] == [False, True]
    for a, b in zip(vec[0]["history"], seq[0]["history"]):
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-3)
