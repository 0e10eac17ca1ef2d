"""The built-in coordinate checks (``mupp coordcheck``): the library's measurements
(:mod:`mupp.diagnostics`) on the built-in models, trained on a dataset of :mod:`mupp.lab.data`.

- :func:`coordcheck`: per-layer perturbation and update scaling across widths (Sec. 3, Fig. 2);
- :func:`last_layer_equivalence`: how close μP-global SAM is to last-layer SAM (Prop. 2,
  App. H.1).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..choices import MODEL_NAMES, ModelName, check_choice
from ..diagnostics.coordcheck import coord_data, slope, train_steps
from ..diagnostics.verify import default_loss
from ..models import build
from ..optim import SAM
from . import data as data_mod

# base widths of the built-in checks (a ResNet's width is its first stage's channel count)
DEFAULT_BASE = {"mlp": 64, "resnet8": 8, "resnet10": 8, "resnet18": 8, "vit": 32, "gpt": 64}
# the GPT of the built-in checks (the language-model study's: untied readout): 2 blocks of 4 heads on random characters (Tiny Shakespeare's
# alphabet size) in contexts of 32
GPT_CHECK = dict(n_layer=2, n_head=4, block_size=32, vocab_size=65, tie_readout=False)


def check_model(
    model: str, width: float, base: float, num_classes: int, sp: bool = False
) -> torch.nn.Module:
    """The model at ``width``; with ``sp`` the MLP gets standard (He, readout ``1/fan_in``)
    initialization instead of μP, and the GPT is the standard network (``1/sqrt(d_head)``
    attention, no output multiplier, PyTorch's init; :class:`~mupp.models.GPTConfig`'s
    ``mup=False``); their width metadata is still set, for the measurements."""
    if model == "mlp":
        net = build("mlp", width, base, d_out=num_classes)
        if sp:
            net.reset_parameters(mup=False)
        return net
    if model == "vit":
        return build("vit", width, base, depth=2, heads=2, num_classes=num_classes, patch=8)
    if model == "gpt":
        return build("gpt", width, base, **GPT_CHECK, mup=not sp)
    return build(model, width, base, num_classes=num_classes)


def token_batches(
    vocab_size: int, batch_size: int, seq_len: int, gen: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Random token sequences without end, ``(inputs (batch, seq_len), next tokens)``: the
    stream of a language model's coordinate check, in the order ``gen`` draws."""
    while True:
        x = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=gen)
        yield x[:, :-1], x[:, 1:]


def _train(
    model_name: str,
    width: float,
    base_width: float,
    *,
    parameterization: str,
    variant: str,
    rule: str,
    steps: int,
    seed: int,
    lr: float,
    rho: float,
    batch_size: int,
    dataset: data_mod.Dataset,
):
    """Build and train one width of a built-in model for ``steps`` SAM steps (``rho = 0``:
    plain μP SGD)."""
    torch.manual_seed(seed)
    model = check_model(
        model_name, width, base_width, dataset.num_classes, sp=parameterization == "sp"
    )
    opt = sgd_sam(model, parameterization, variant, rule, lr, rho)
    gen = torch.Generator().manual_seed(seed)
    batches = infinite_batches(dataset, batch_size, gen, model_name == "mlp")
    train_steps(model, opt, batches, steps)
    return model, opt, batches


def sgd_sam(
    model: torch.nn.Module,
    parameterization: str,
    variant: str,
    rule: str,
    lr: float,
    rho: float,
    **options: Any,
) -> SAM:
    """:class:`mupp.SAM` over SGD: the optimizer of the built-in coordinate checks; ``options``
    go to it (``ascent="momentum", momentum=0.9``; ``every=5, reuse="looksam"``)."""
    return SAM(
        model.parameters(),
        torch.optim.SGD,
        lr=lr,
        rho=rho,
        parameterization=parameterization,
        variant=variant,
        rule=rule,
        **options,
    )


def _probe(model_name: str, dataset: data_mod.Dataset) -> torch.Tensor:
    probe = data_mod.normalize(dataset.test.x[:64], dataset.name)
    return probe.flatten(1) if model_name == "mlp" else probe


def last_layer_equivalence(
    model: str = "mlp",
    widths: Sequence[float] = (64, 256, 1024),
    *,
    base_width: float | None = None,
    steps: int = 50,
    seeds: int = 1,
    lr: float = 0.05,
    rho: float = 0.1,
    batch_size: int = 64,
    dataset: str = "synthetic",
    data_dir: str | None = None,
) -> dict[str, Any]:
    """App. H.1 / Prop. 2: under μP-global, SAM behaves like last-layer SAM at large width.

    Trains SAM (μP-global), last-layer SAM (μP-global) and SGD (μP) from the same init on the
    same batches and reports per width ``gap = ||f_SAM - f_LL|| / ||f_SAM - f_SGD||`` on a probe
    batch: the share of SAM's effect on the function that last-layer SAM does *not* reproduce.
    It shrinks as width grows."""
    if len(widths) < 2:
        raise ValueError(f"widths needs at least 2 entries to fit a slope; got {list(widths)}")
    if model == "gpt":
        raise ValueError("--compare-last-layer runs on the image models; the gpt is not one")
    base = DEFAULT_BASE[model] if base_width is None else base_width
    ds = data_mod.load(dataset, data_dir)
    probe = _probe(model, ds)
    gaps = []
    for w in widths:
        vals = []
        for s in range(seeds):
            outs = {}
            for name, variant, r in (
                ("sam", "sam", rho),
                ("ll", "last-layer", rho),
                ("sgd", "sam", 0.0),
            ):
                m, _, _ = _train(
                    model,
                    w,
                    base,
                    parameterization="mup-global",
                    variant=variant,
                    rule="LP",
                    steps=steps,
                    seed=s,
                    lr=lr,
                    rho=r,
                    batch_size=batch_size,
                    dataset=ds,
                )
                m.eval()
                with torch.no_grad():
                    outs[name] = m(probe)
            vals.append(
                ((outs["sam"] - outs["ll"]).norm() / (outs["sam"] - outs["sgd"]).norm()).item()
            )
        gaps.append(float(np.mean(vals)))
    return {"widths": list(widths), "gap": gaps, "slope": slope(widths, gaps)}


def infinite_batches(
    ds: data_mod.Dataset, batch_size: int, gen: torch.Generator, flatten: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled training batches of ``ds`` without end (full batches only; ``flatten``: images
    as vectors), in the order ``gen`` draws: the stream of a coordinate check."""
    while True:
        yield from data_mod.batches(
            ds.train,
            batch_size,
            shuffle=True,
            generator=gen,
            name=ds.name,
            flatten=flatten,
            drop_last=True,
        )


def coordcheck(
    model: ModelName = "mlp",
    widths: Sequence[float] = (64, 128, 256, 512),
    *,
    base_width: float | None = None,
    parameterization: str = "mupp",
    variant: str = "sam",
    rule: str = "LP",
    steps: int = 10,
    seeds: int = 2,
    lr: float = 0.1,
    rho: float = 0.1,
    batch_size: int = 64,
    dataset: str = "synthetic",
    data_dir: str | None = None,
    progress: bool = True,
    sam_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The coordinate check of a built-in model (:data:`mupp.choices.MODEL_NAMES`; the ViT
    with 2 blocks of 2 heads) trained with SGD-based SAM for ``steps`` steps; see
    :func:`mupp.diagnostics.coord_data` for any model and for the returned record (Fig. 2).
    ``sam_options`` go to :class:`mupp.SAM` (and the record's config): e.g. Momentum-SAM,
    ``{"ascent": "momentum", "momentum": 0.9}``, whose ε should scale as two-pass SAM's."""
    sam_options = dict(sam_options or {})
    check_choice("model", model, MODEL_NAMES)
    base = DEFAULT_BASE[model] if base_width is None else base_width
    ds = data_mod.load(dataset, data_dir)
    config = dict(
        model=model,
        base_width=base,
        parameterization=parameterization,
        variant=variant,
        rule=rule,
        lr=lr,
        rho=rho,
        batch_size=batch_size,
        dataset=dataset,
        **sam_options,
    )
    if model == "gpt":
        config["dataset"] = "random tokens"

        def batches(seed: int) -> Iterator:
            gen = torch.Generator().manual_seed(seed)
            return token_batches(GPT_CHECK["vocab_size"], batch_size, GPT_CHECK["block_size"], gen)

        probe = None  # the first batch
    else:

        def batches(seed: int) -> Iterator:
            gen = torch.Generator().manual_seed(seed)
            return infinite_batches(ds, batch_size, gen, model == "mlp")

        probe = _probe(model, ds)
    return coord_data(
        lambda w: check_model(model, w, base, ds.num_classes, sp=parameterization == "sp"),
        widths,
        lambda m: sgd_sam(m, parameterization, variant, rule, lr, rho, **sam_options),
        batches,
        steps=steps,
        seeds=seeds,
        probe=probe,
        loss_fn=default_loss,
        progress=progress,
        config=config,
    )
