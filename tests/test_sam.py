"""SAM: perturbations per rule/variant against hand-written formulas, exactness, state, bad input."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from builders import mlp, prepared_mlp
from torch import nn

import mupp
from mupp import SAM

M = 4  # width multiplier of the test MLP (width 32 against base 8)
X = torch.randn(16, 12)
Y = torch.randint(0, 5, (16,))


def loss_fn(model):
    dtype = next(model.parameters()).dtype
    return F.cross_entropy(model(X.to(dtype)), Y)


def grads_and_eps(model, **kw):
    """Gradients at w and the perturbation ε that first_step adds (float64: ε is exact)."""
    model.double()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, **kw)
    loss_fn(model).backward()
    g = [p.grad.clone() for p in model.parameters()]
    w = [p.detach().clone() for p in model.parameters()]
    opt.first_step()
    eps = [p.detach() - w0 for p, w0 in zip(model.parameters(), w)]
    opt.second_step()
    return g, w, eps


def fro(t):
    return t.norm()


def test_lp_mupp_matches_definition_4_with_theorem_11():
    m = prepared_mlp(32, 8)
    rho = 0.05
    g, w, eps = grads_and_eps(m, rho=rho, parameterization="mupp")
    d, dl = -0.5, [-0.5, 0.5, 1.5]
    v = [M ** (-e) * gi for e, gi in zip(dl, g)]
    nv = math.sqrt(sum(fro(x) ** 2 for x in v))
    for e, vi in zip(eps, v):
        torch.testing.assert_close(e, rho * M ** (-d) * vi / nv, rtol=1e-5, atol=1e-7)


def test_lp_global_and_naive():
    m = prepared_mlp(32, 8)
    g, _, eps = grads_and_eps(
        mupp.reattach(copy.deepcopy(m)), rho=0.05, parameterization="mup-global"
    )
    ng = math.sqrt(sum(fro(x) ** 2 for x in g))
    for e, gi in zip(eps, g):
        torch.testing.assert_close(e, 0.05 * M**-0.5 * gi / ng, rtol=1e-5, atol=1e-8)
    g, _, eps = grads_and_eps(
        mupp.reattach(copy.deepcopy(m)), rho=0.05, parameterization="mup-naive"
    )
    ng = math.sqrt(sum(fro(x) ** 2 for x in g))
    for e, gi in zip(eps, g):
        torch.testing.assert_close(e, 0.05 * gi / ng, rtol=1e-5, atol=1e-8)


def test_dp_algorithm_1():
    m = prepared_mlp(32, 8)
    g, _, eps = grads_and_eps(m, rho=0.05, rule="DP")
    num = [M, 1.0, 1 / M]  # fan_out/fan_in
    den = [M**0.5, 1.0, M**-0.5]  # sqrt(fan_out/fan_in); readout (n_L n_{L+1})^{-1/2}
    nd = math.sqrt(sum((s * fro(x)) ** 2 for s, x in zip(den, g)))
    for e, gi, r in zip(eps, g, num):
        torch.testing.assert_close(e, 0.05 * r * gi / nd, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("rule", ["LP", "DP"])
def test_denominator_terms_are_the_joint_norm_of_the_step(rule):
    # Def. 4 / Remark F.4: ||ε_l|| = ρ num_l ||g_l|| / sqrt(Σ_k (den_k ||g_k||)²), and the
    # terms are den_l ||g_l|| for SAM; reading them leaves the gradients untouched
    m = prepared_mlp(32, 8).double()
    opt = SAM(m.parameters(), torch.optim.SGD, lr=0.1, rho=0.05, rule=rule)
    loss_fn(m).backward()
    g = [p.grad.clone() for p in m.parameters()]
    terms = opt.denominator_terms()
    assert [p for p, _ in terms] == list(m.parameters())
    assert all(torch.equal(p.grad, gi) for p, gi in zip(m.parameters(), g))
    den = {id(p): grp["pert_den"] for grp in opt.param_groups for p in grp["params"]}
    num = {id(p): grp["pert_num"] for grp in opt.param_groups for p in grp["params"]}
    for (p, t), gi in zip(terms, g):
        assert t == pytest.approx(den[id(p)] * fro(gi).item(), rel=1e-12)
    total = math.sqrt(sum(t**2 for _, t in terms))
    w = [p.detach().clone() for p in m.parameters()]
    opt.first_step()
    for p, w0, gi in zip(m.parameters(), w, g):
        expected = 0.05 * num[id(p)] * fro(gi).item() / total
        assert fro(p.detach() - w0).item() == pytest.approx(expected, rel=1e-6)  # fp32 scales
    opt.second_step()
    with pytest.raises(ValueError, match="jointly normalized rule.*rule='LN'"):
        SAM(m.parameters(), torch.optim.SGD, lr=0.1, rho=0.05, rule="LN").denominator_terms()


def test_ln_layerwise_normalization():
    m = prepared_mlp(32, 8)
    g, _, eps = grads_and_eps(m, rho=0.05, rule="LN")
    for e, gi, r in zip(eps, g, [M**0.5, 1.0, M**-0.5]):
        torch.testing.assert_close(e, 0.05 * r * gi / fro(gi), rtol=1e-5, atol=1e-8)


def test_unnormalized_scales_like_sgd_lr():
    m = prepared_mlp(32, 8)
    g, _, eps = grads_and_eps(m, rho=0.05, rule="unnormalized")
    for e, gi, r in zip(eps, g, [M, 1.0, 1 / M]):
        torch.testing.assert_close(e, 0.05 * r * gi, rtol=1e-5, atol=1e-8)


def test_asam_elementwise_table_1():
    m = prepared_mlp(32, 8)
    g, w, eps = grads_and_eps(m, rho=0.05, variant="asam-elem")
    # μP²: global n^{1/2}, no layerwise rescaling (Table 1, App. F.4.1)
    nrm = math.sqrt(sum(fro(wi.abs() * gi) ** 2 for wi, gi in zip(w, g)))
    for e, wi, gi in zip(eps, w, g):
        torch.testing.assert_close(e, 0.05 * M**0.5 * wi * wi * gi / nrm, rtol=1e-5, atol=1e-9)


def test_asam_layerwise_table_1():
    m = prepared_mlp(32, 8)
    g, w, eps = grads_and_eps(m, rho=0.05, variant="asam-layer")
    dl = [0.0, 1.0, 0.0]  # d = 0 (App. F.4.2)
    nrm = math.sqrt(sum((M**-e * fro(wi) * fro(gi)) ** 2 for e, wi, gi in zip(dl, w, g)))
    for e, wi, gi, k in zip(eps, w, g, dl):
        torch.testing.assert_close(e, 0.05 * M**-k * fro(wi) ** 2 * gi / nrm, rtol=1e-5, atol=1e-9)


def test_last_layer_and_first_layer_variants():
    m = prepared_mlp(32, 8)
    g, _, eps = grads_and_eps(mupp.reattach(copy.deepcopy(m)), rho=0.05, variant="last-layer")
    assert eps[0].abs().max() == 0 and eps[1].abs().max() == 0
    torch.testing.assert_close(eps[2], 0.05 * M**-0.5 * g[2] / fro(g[2]), rtol=1e-5, atol=1e-8)
    g, _, eps = grads_and_eps(mupp.reattach(copy.deepcopy(m)), rho=0.05, variant="first-layer")
    assert eps[1].abs().max() == 0 and eps[2].abs().max() == 0
    torch.testing.assert_close(eps[0], 0.05 * M**0.5 * g[0] / fro(g[0]), rtol=1e-5, atol=1e-8)


def test_sam_on_perturbs_only_normalization_parameters():
    class Net(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.fc1 = nn.Linear(12, w)
            self.ln = nn.LayerNorm(w)
            self.fc2 = nn.Linear(w, 5)

        def forward(self, x):
            return self.fc2(torch.relu(self.ln(self.fc1(x))))

    m = mupp.set_base_shapes(Net(32), Net(8)).double()
    opt = SAM(m.parameters(), torch.optim.SGD, lr=0.1, rho=0.05, variant="sam-on")
    loss_fn(m).backward()
    g = {n: p.grad.clone() for n, p in m.named_parameters()}
    w = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt.first_step()
    eps = {n: p.detach() - w[n] for n, p in m.named_parameters()}
    for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        assert eps[n].abs().max() == 0, n
    nrm = math.sqrt(fro(g["ln.weight"]) ** 2 + fro(g["ln.bias"]) ** 2)
    for n in ("ln.weight", "ln.bias"):  # global n^{1/2}, input-like factor 1
        torch.testing.assert_close(eps[n], 0.05 * M**0.5 * g[n] / nrm, rtol=1e-5, atol=1e-9)


def test_general_form_roles_follow_appendix_f1():
    m = prepared_mlp(32, 8)
    g, _, eps = grads_and_eps(m, rho=0.05, perturb={"hidden", "output"})
    # rule 2 of App. F.1: d = 0, hidden d_l = 0, output d_l = 1
    v = [M**-0.0 * g[1], M**-1.0 * g[2]]
    nv = math.sqrt(sum(fro(x) ** 2 for x in v))
    assert eps[0].abs().max() == 0
    torch.testing.assert_close(eps[1], 0.05 * v[0] / nv, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(eps[2], 0.05 * v[1] / nv, rtol=1e-5, atol=1e-8)


def test_mup_readout_multiplier_uses_lemma_f12():
    m = prepared_mlp(32, 8)
    g, _, eps = grads_and_eps(m, rho=0.05, weight_multipliers="mup")
    d, dl = -0.5, [-0.5, 0.5, -0.5]
    v = [M ** (-e) * gi for e, gi in zip(dl, g)]
    nv = math.sqrt(sum(fro(x) ** 2 for x in v))
    for e, vi in zip(eps, v):
        torch.testing.assert_close(e, 0.05 * M ** (-d) * vi / nv, rtol=1e-5, atol=1e-8)


def test_mu_lr_factors_in_param_groups():
    m = prepared_mlp(32, 8)
    opt = SAM(m.parameters(), torch.optim.SGD, lr=0.1, rho=0.05, momentum=0.9)
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert [lr[id(p)] for p in m.parameters()] == pytest.approx([0.4, 0.1, 0.025])
    opt = SAM(m.parameters(), torch.optim.AdamW, lr=0.1, rho=0.05)
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert [lr[id(p)] for p in m.parameters()] == pytest.approx([0.1, 0.025, 0.025])
    assert opt.param_groups is opt.base_optimizer.param_groups


def reference_sam_step(model, base, rho, closure):
    """Plain SAM as the popular PyTorch packages write it (loop over parameters, stored copy)."""
    loss = closure()
    with torch.no_grad():
        norm = torch.norm(
            torch.stack([p.grad.norm(2) for p in model.parameters() if p.grad is not None]), 2
        )
        old = {}
        for p in model.parameters():
            old[p] = p.data.clone()
            p.add_(p.grad * (rho / (norm + 1e-12)))
    base.zero_grad()
    closure()
    with torch.no_grad():
        for p in model.parameters():
            p.data = old[p]
    base.step()
    base.zero_grad()
    return loss


@pytest.mark.parametrize(
    "parameterization,width,base_cls,kw",
    [
        ("mupp", 8, torch.optim.SGD, dict(momentum=0.9, weight_decay=5e-4)),
        ("mupp", 8, torch.optim.AdamW, dict(weight_decay=0.1)),
        ("mupp", 8, torch.optim.SGD, dict(momentum=0.9, rule="DP")),
        ("sp", 32, torch.optim.SGD, dict(momentum=0.9)),
    ],
)
def test_equals_plain_sam_at_base_width_and_sp(parameterization, width, base_cls, kw):
    # float64: Adam's 1/sqrt(v) amplifies float32 summation-order noise (a 4e-7 gap on
    # one CI CPU); in float64 any scaling error still shows at the size of lr * rho.
    torch.manual_seed(3)
    a = prepared_mlp(width, 8).double()
    b = copy.deepcopy(a)
    kw = dict(kw)
    rule = kw.pop("rule", "LP")
    opt = SAM(
        a.parameters(),
        base_cls,
        lr=0.05,
        rho=0.1,
        parameterization=parameterization,
        rule=rule,
        **kw,
    )
    ref = base_cls(b.parameters(), lr=0.05, **kw)
    for _ in range(5):

        def ca():
            loss = loss_fn(a)
            loss.backward()
            return loss

        def cb():
            loss = loss_fn(b)
            loss.backward()
            return loss

        la = opt.step(ca)
        opt.zero_grad()
        lb = reference_sam_step(b, ref, 0.1, cb)
        torch.testing.assert_close(la, lb)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12)


def test_exact_restore_and_first_second_step_contract():
    m = prepared_mlp()
    opt = SAM(m.parameters(), torch.optim.SGD, lr=0.0, rho=0.5)
    w = [p.detach().clone() for p in m.parameters()]
    loss_fn(m).backward()
    opt.first_step(zero_grad=True)
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in m.parameters())
    assert any(not torch.equal(p, w0) for p, w0 in zip(m.parameters(), w))
    with pytest.raises(RuntimeError, match="first_step\\(\\) called twice"):
        opt.first_step()
    loss_fn(m).backward()
    opt.second_step()
    for p, w0 in zip(m.parameters(), w):
        assert torch.equal(p, w0)  # lr 0: bit-exact restore
    with pytest.raises(RuntimeError, match="before first_step"):
        opt.second_step()
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()


def test_state_dict_resume_continues_identically():
    torch.manual_seed(5)
    a = prepared_mlp()
    opt = SAM(a.parameters(), torch.optim.SGD, lr=0.05, rho=0.1, momentum=0.9)

    def closure_for(model):
        def c():
            loss = loss_fn(model)
            loss.backward()
            return loss

        return c

    for _ in range(3):
        opt.step(closure_for(a))
        opt.zero_grad()
    sd = copy.deepcopy(opt.state_dict())
    assert any("momentum_buffer" in s for s in sd["state"].values())
    b = copy.deepcopy(a)
    mupp.reattach(b)
    opt_b = SAM(b.parameters(), torch.optim.SGD, lr=0.05, rho=0.1, momentum=0.9)
    opt_b.load_state_dict(sd)
    assert opt_b.param_groups is opt_b.base_optimizer.param_groups
    for _ in range(3):
        opt.step(closure_for(a))
        opt.zero_grad()
        opt_b.step(closure_for(b))
        opt_b.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_lr_scheduler_and_per_group_rho():
    m = prepared_mlp()
    opt = SAM(
        [{"params": [m[0].weight], "rho": 0.0}, {"params": [m[2].weight, m[4].weight]}],
        torch.optim.SGD,
        lr=0.1,
        rho=0.2,
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    before = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    loss_fn(m).backward()
    w0 = m[0].weight.detach().clone()
    opt.first_step(zero_grad=True)
    assert torch.equal(m[0].weight, w0)  # rho = 0 in its group
    loss_fn(m).backward()
    opt.second_step(zero_grad=True)
    sched.step()
    after = {id(p): g["lr"] for g in opt.base_optimizer.param_groups for p in g["params"]}
    assert all(after[k] == pytest.approx(before[k] * 0.5) for k in before)


def test_frozen_and_gradless_parameters_are_skipped():
    m = prepared_mlp(bias=True)
    m[0].weight.requires_grad_(False)
    opt = SAM(m.parameters(), torch.optim.SGD, lr=0.1, rho=0.1)
    w = m[0].weight.detach().clone()
    b4 = m[4].bias.detach().clone()
    F.cross_entropy(m(X), Y).backward()
    m[4].bias.grad = None
    opt.first_step()
    assert torch.equal(m[0].weight, w) and torch.equal(m[4].bias, b4)
    opt.second_step()


def test_zero_gradient_gives_zero_perturbation():
    m = prepared_mlp()
    opt = SAM(m.parameters(), torch.optim.SGD, lr=0.1, rho=0.1)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    w = [p.detach().clone() for p in m.parameters()]
    opt.first_step()
    assert all(torch.equal(p, w0) for p, w0 in zip(m.parameters(), w))
    opt.restore()


@pytest.mark.parametrize("where", ["first", "second"])
def test_nonfinite_gradients_never_reach_the_weights(where):
    m = prepared_mlp()
    opt = SAM(m.parameters(), torch.optim.SGD, lr=0.1, rho=0.1, momentum=0.9)
    w = [p.detach().clone() for p in m.parameters()]
    loss_fn(m).backward()
    if where == "first":
        m[2].weight.grad[0, 0] = float("inf")
    opt.first_step(zero_grad=True)
    loss_fn(m).backward()
    if where == "second":
        m[4].weight.grad[0, 0] = float("nan")
    opt.second_step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, w0) for p, w0 in zip(m.parameters(), w))
    assert not opt.base_optimizer.state  # momentum untouched
    opt2 = SAM(m.parameters(), torch.optim.SGD, lr=0.1, rho=0.1, nonfinite="raise")
    loss_fn(m).backward()
    opt2.first_step(zero_grad=True)
    loss_fn(m).backward()
    m[4].weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="weights are unchanged"):
        opt2.second_step()
    assert all(torch.equal(p, w0) for p, w0 in zip(m.parameters(), w))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(rho=-1.0), "rho must be a non-negative finite number"),
        (dict(rho=float("nan")), "rho must be a non-negative finite number"),
        (dict(lr=float("inf")), "lr must be a non-negative finite number"),
        (dict(parameterization="mup"), "parameterization must be one of"),
        (dict(rule="XX"), "rule must be one of"),
        (dict(variant="asam"), "variant must be one of"),
        (dict(variant="asam-elem", rule="DP"), "needs rule='LP'"),
        (dict(nonfinite="maybe"), "nonfinite must be one of"),
        (dict(weight_multipliers="foo"), "weight_multipliers must be one of"),
    ],
)
def test_bad_arguments(kw, match):
    m = prepared_mlp()
    args = dict(lr=0.1, rho=0.1)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        SAM(m.parameters(), torch.optim.SGD, **args)


def test_bad_base_optimizer_and_missing_metadata():
    with pytest.raises(ValueError, match="base_optimizer must be a torch.optim.Optimizer class"):
        SAM(prepared_mlp().parameters(), "sgd", lr=0.1, rho=0.1)
    with pytest.raises(ValueError, match="has no width metadata"):
        SAM(mlp(8).parameters(), torch.optim.SGD, lr=0.1, rho=0.1)
    SAM(mlp(8).parameters(), torch.optim.SGD, lr=0.1, rho=0.1, parameterization="sp")


def test_rho_is_checked_at_the_door_the_same_way_everywhere():
    """ρ is validated where it enters (construction, a param group, a loaded state dict) with
    one check and one message, and never per step; a 0-dim tensor is a number there."""
    torch.manual_seed(0)
    m1 = prepared_mlp()
    m2 = mupp.reattach(copy.deepcopy(m1))
    o1 = SAM(m1.parameters(), torch.optim.SGD, lr=0.1, rho=0.05)
    o2 = SAM(m2.parameters(), torch.optim.SGD, lr=0.1, rho=torch.tensor(0.05))
    for m, o in ((m1, o1), (m2, o2)):
        o.step(lambda m=m: loss_fn(m).backward() or loss_fn(m))
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    with pytest.raises(ValueError, match=r"^rho must be a non-negative finite number; got -1$"):
        SAM(prepared_mlp().parameters(), torch.optim.SGD, lr=0.1, rho=-1)
    with pytest.raises(ValueError, match=r"rho \(param group\) must be a non-negative finite"):
        SAM([{"params": list(prepared_mlp().parameters()), "rho": float("nan")}],
            torch.optim.SGD, lr=0.1, rho=0.1)  # fmt: skip
    state = o1.state_dict()
    state["param_groups"][0]["rho"] = -0.1
    with pytest.raises(ValueError, match="optimizer state_dict: param group 0 rho must be"):
        o1.load_state_dict(state)


def test_a_param_group_added_after_construction_is_refused_clearly():
    m = prepared_mlp()
    opt = SAM(list(m.parameters())[:-1], torch.optim.SGD, lr=0.1, rho=0.1)
    groups = len(opt.param_groups)
    with pytest.raises(ValueError, match="SAM.add_param_group after construction is not"):
        opt.add_param_group({"params": [list(m.parameters())[-1]]})
    assert len(opt.param_groups) == groups  # nothing half-added


def test_batchnorm_stats_frozen_in_perturbed_pass():
    bn_model = nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5))
    bn = bn_model[1]
    bn_model(X)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    with mupp.frozen_bn_stats(bn_model):
        bn_model(X).sum().backward()
    for k, v in bn.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert bn.track_running_stats
    bn_model(X)
    assert bn.num_batches_tracked.item() == 2


def test_same_randomness_replays_dropout_masks():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 32), nn.Dropout(0.5), nn.Linear(32, 5))
    opt = SAM(
        net.parameters(),
        torch.optim.SGD,
        lr=0.0,
        rho=0.0,
        parameterization="sp",
        same_randomness=True,
    )
    outs = []

    def closure():
        out = net(X)
        outs.append(out.detach())
        out.sum().backward()
        return out.sum()

    opt.step(closure)
    assert torch.equal(outs[0], outs[1])


def test_autocast_bf16_and_gradscaler_recipe():
    m = prepared_mlp()
    opt = SAM(m.parameters(), torch.optim.SGD, lr=0.1, rho=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_fn(m).backward()
    opt.first_step(zero_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_fn(m).backward()
    opt.second_step(zero_grad=True)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    # GradScaler: an overflow in the first pass skips the whole step
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    w = [p.detach().clone() for p in m.parameters()]
    scaler.scale(loss_fn(m)).backward()
    m[2].weight.grad[0, 0] = float("inf")
    opt.first_step(zero_grad=True)
    scaler.scale(loss_fn(m)).backward()
    opt.second_step(zero_grad=True, scaler=scaler)
    scaler.update()
    assert scaler.get_scale() == 2.0**3
    assert all(torch.equal(p, w0) for p, w0 in zip(m.parameters(), w))


def test_m_sharpness_with_restore_and_accumulation():
    """m-sharpness: a perturbation per sub-batch, descent gradients averaged (docs recipe)."""
    m = prepared_mlp()
    opt = SAM(m.parameters(), torch.optim.SGD, lr=0.1, rho=0.1)
    params = list(m.parameters())
    acc = [torch.zeros_like(p) for p in params]
    chunks = list(zip(X.chunk(4), Y.chunk(4)))
    w = [p.detach().clone() for p in params]
    expected = [torch.zeros_like(p) for p in params]
    for xb, yb in chunks:
        opt.zero_grad()
        F.cross_entropy(m(xb), yb).backward()
        opt.first_step(zero_grad=True)
        (F.cross_entropy(m(xb), yb) / len(chunks)).backward()
        for a, e, p in zip(acc, expected, params):
            a += p.grad
            e += p.grad
        opt.restore()
    for p, a in zip(params, acc):
        p.grad = a
    opt.base_optimizer.step()
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for p, w0, e in zip(params, w, expected):
        torch.testing.assert_close(p.detach(), w0 - lrs[id(p)] * e)


def test_last_layer_fast_path_skips_earlier_gradients_and_matches():
    torch.manual_seed(2)
    a = prepared_mlp()
    b = mupp.reattach(copy.deepcopy(a))
    oa = SAM(a.parameters(), torch.optim.SGD, lr=0.1, rho=0.2, variant="last-layer")
    ob = SAM(b.parameters(), torch.optim.SGD, lr=0.1, rho=0.2, variant="last-layer")
    with oa.ascent_pass():
        loss_fn(a).backward()
    assert a[0].weight.grad is None and a[2].weight.grad is None and a[4].weight.grad is not None
    assert all(p.requires_grad for p in a.parameters())
    loss_fn(b).backward()
    oa.first_step(zero_grad=True)
    ob.first_step(zero_grad=True)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    for model, opt in ((a, oa), (b, ob)):
        loss_fn(model).backward()
        opt.second_step(zero_grad=True)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_parameters_that_are_views_take_the_copy_path():
    flat = torch.nn.Parameter(torch.randn(12 * 4 + 4))
    w, b = torch.nn.Parameter(torch.empty(4, 12)), torch.nn.Parameter(torch.empty(4))
    w.data = flat.data[:48].view(4, 12)  # views into one storage, as FSDP sets them
    b.data = flat.data[48:]
    opt = SAM([w, b], torch.optim.SGD, lr=0.0, rho=0.1, parameterization="sp")
    (X @ w.T + b).square().mean().backward()
    opt.first_step(zero_grad=True)
    assert w.data.data_ptr() == flat.data.data_ptr()  # still a view into the flat storage
    assert not torch.equal(flat.data[:48].view(4, 12), torch.zeros(4, 12))
    before = flat.data.clone()
    opt.restore()
    assert not torch.equal(flat.data, before)  # the restore wrote through the view


@pytest.mark.parametrize("parameterization", ["mup-naive", "mup-global", "mupp"])
@pytest.mark.parametrize("variant", ["sam", "asam-elem", "asam-layer", "last-layer"])
def test_optimizer_exponents_come_from_theory(parameterization, variant):
    from mupp import theory

    m = prepared_mlp(32, 8)
    opt = SAM(
        m.parameters(),
        torch.optim.SGD,
        lr=0.1,
        rho=0.1,
        parameterization=parameterization,
        variant=variant,
    )
    th_variant, roles = {"last-layer": ("sam", ["output"])}.get(variant, (variant, None))
    d, by_role = theory.variant_exponents(th_variant, parameterization, roles=roles)
    group = {id(p): g for g in opt.param_groups for p in g["params"]}
    for p, role in zip(m.parameters(), ["input", "hidden", "output"]):
        g = group[id(p)]
        if role not in by_role:
            assert not g["perturb"]
            continue
        assert g["pert_num"] == pytest.approx(M ** (-d) * M ** (-by_role[role]))
        assert g["pert_den"] == pytest.approx(M ** (-by_role[role]))


SCALER_CASES = [(rule, "sam", 0.0) for rule in ("LP", "DP", "LN", "unnormalized")]
SCALER_CASES += [("LP", v, 0.0) for v in ("asam-elem", "asam-layer", "last-layer", "first-layer")]
SCALER_CASES += [("unnormalized", "last-layer", 0.0), ("LP", "sam", 0.05)]
SCALER_CASES += [("unnormalized", "sam", 0.05)]


@pytest.mark.parametrize("rule,variant,awd", SCALER_CASES)
def test_gradscaler_path_equals_the_unscaled_one(rule, variant, awd):
    """first_step(scaler=...) builds ε from unscaled gradients, so a power-of-2 loss scale
    changes nothing, for every rule and variant (the unnormalized rule and the ascent weight
    decay depend on the gradient's scale; the normalized rules cancel it)."""
    kw = dict(rho=0.1, rule=rule, variant=variant, ascent_weight_decay=awd)
    ref = prepared_mlp()
    scaled = copy.deepcopy(ref)
    mupp.reattach(scaled)
    opt_ref = SAM(ref.parameters(), torch.optim.SGD, lr=0.1, **kw)
    opt = SAM(scaled.parameters(), torch.optim.SGD, lr=0.1, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for _ in range(2):
        loss_fn(ref).backward()
        opt_ref.first_step(zero_grad=True)
        loss_fn(ref).backward()
        opt_ref.second_step(zero_grad=True)

        scaler.scale(loss_fn(scaled)).backward()
        opt.first_step(zero_grad=True, scaler=scaler)
        scaler.scale(loss_fn(scaled)).backward()
        opt.second_step(zero_grad=True, scaler=scaler)
        scaler.update()
    assert scaler.get_scale() == 2.0**12
    for p, q in zip(ref.parameters(), scaled.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_without_the_scaler_the_unnormalized_rule_sees_the_scale():
    """Why first_step takes the scaler: the scaled gradient would blow ε up by 2^12."""
    m = prepared_mlp()
    opt = SAM(m.parameters(), torch.optim.SGD, lr=0.1, rho=0.1, rule="unnormalized")
    w = [p.detach().clone() for p in m.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaler.scale(loss_fn(m)).backward()
    g = [p.grad.clone() / 2.0**12 for p in m.parameters()]
    opt.first_step(scaler=scaler)
    eps = [p.detach() - w0 for p, w0 in zip(m.parameters(), w)]
    opt.restore()
    opt.first_step()  # the same (scaled) gradients, no scaler
    eps_raw = [p.detach() - w0 for p, w0 in zip(m.parameters(), w)]
    opt.restore()
    for e, er, gi in zip(eps, eps_raw, g):
        assert torch.allclose(er, e * 2.0**12, rtol=1e-3, atol=1e-3)
        assert e.norm() <= 10 * gi.norm()  # ρ·num·g with num <= M: the unscaled size


def test_step_completes_a_pending_first_step_and_runs_the_closure_once():
    m = prepared_mlp()
    ref = copy.deepcopy(m)
    mupp.reattach(ref)
    opt = SAM(m.parameters(), torch.optim.SGD, lr=0.1, rho=0.1)
    opt_ref = SAM(ref.parameters(), torch.optim.SGD, lr=0.1, rho=0.1)
    loss_fn(m).backward()
    opt.first_step(zero_grad=True)
    loss_fn(m).backward()
    calls = []
    assert opt.step(lambda: calls.append(1) or 7.0) == 7.0  # a hook-only closure, as Lightning's
    assert calls == [1] and opt._step is None
    opt_ref.step(lambda: loss_fn(ref).backward())
    for p, q in zip(m.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(RuntimeError, match="SAMTrainer"):
        opt.step()


def test_a_variant_that_perturbs_nothing_is_refused():
    from mupp.models import GPT

    tied = GPT(width=32, base_width=16, n_layer=1, n_head=2, block_size=8, vocab_size=11)
    with pytest.raises(ValueError, match="variant 'last-layer' perturbs no parameter"):
        SAM(tied.parameters(), torch.optim.AdamW, lr=1e-3, rho=0.1, variant="last-layer")
    untied = GPT(width=32, base_width=16, n_layer=1, n_head=2, block_size=8, vocab_size=11,
                 tie_readout=False)  # fmt: skip
    opt = SAM(untied.parameters(), torch.optim.AdamW, lr=1e-3, rho=0.1, variant="last-layer")
    perturbed = [p for g in opt.param_groups if g["perturb"] for p in g["params"]]
    assert perturbed == [untied.readout.weight]


def test_eps_for_an_optimizer_without_one_names_norm_eps():
    model = prepared_mlp()
    with pytest.raises(ValueError, match=r"eps: SGD takes no eps; .*norm_eps=1e-12"):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.05, eps=1e-12)
    SAM(model.parameters(), torch.optim.AdamW, lr=0.1, rho=0.05, eps=1e-8)  # Adam's own eps


# ---------------------------------------------------------------- cheap SAM: momentum, every=k

PLANS = {
    "momentum": dict(ascent="momentum"),
    "looksam": dict(every=3, reuse="looksam"),
    "every": dict(every=3),
}


def manual_step(model, opt, scaler=None, poison=None):
    """One step in the documented manual loop: the ascent pass only when the step needs it."""

    def backward():
        loss = loss_fn(model)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if poison is not None:
            poison(model)

    if opt.needs_ascent_gradient:
        backward()
    opt.first_step(zero_grad=True, scaler=scaler)
    backward()
    opt.second_step(zero_grad=True, scaler=scaler)


def closure_for(model):
    def closure():
        loss = loss_fn(model)
        loss.backward()
        return loss

    return closure


def test_every_one_is_two_pass_sam_bitwise():
    torch.manual_seed(3)
    a = prepared_mlp()
    b = copy.deepcopy(a)
    mupp.reattach(b)
    opt_a = SAM(a.parameters(), torch.optim.SGD, lr=0.1, rho=0.1, momentum=0.9)
    opt_b = SAM(b.parameters(), torch.optim.SGD, lr=0.1, rho=0.1, momentum=0.9, every=1)
    for _ in range(4):
        opt_a.step(closure_for(a))
        opt_a.zero_grad()
        manual_step(b, opt_b)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize(
    "base,kw", [(torch.optim.SGD, dict(momentum=0.9)), (torch.optim.AdamW, {})]
)
def test_momentum_sam_first_step_is_the_base_step_then_steps_against_the_momentum(base, kw):
    torch.manual_seed(4)
    m = prepared_mlp().double()  # float64: W + ε - W is ε
    ref = copy.deepcopy(m)
    mupp.reattach(ref)
    opt = SAM(m.parameters(), base, lr=0.01, rho=0.1, ascent="momentum", **kw)
    kind = "sgd" if base is torch.optim.SGD else "adam"
    groups = mupp.mup_param_groups(ref.parameters(), 0.01, kind, "mupp", None)
    opt_ref = base(groups, lr=0.01, **kw)
    assert not opt.needs_ascent_gradient
    opt.step(closure_for(m))  # no momentum yet: ε = 0, the base step
    opt.zero_grad()
    closure_for(ref)()
    opt_ref.step()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), ref.parameters()))
    # the next ε is -ρ num_l v_l / sqrt(Σ den_k² ||v_k||²) with v the momentum (Def. 4)
    key = "momentum_buffer" if kind == "sgd" else "exp_avg"
    w = {p: p.detach().clone() for p in m.parameters()}
    v = {p: opt.base_optimizer.state[p][key].clone() for p in m.parameters()}
    opt.first_step()
    groups = {id(p): g for g in opt.param_groups for p in g["params"]}
    total = math.sqrt(sum((groups[id(p)]["pert_den"] * v[p].norm()) ** 2 for p in v))
    for p in m.parameters():
        expected = -0.1 * groups[id(p)]["pert_num"] * v[p] / total
        torch.testing.assert_close(p.detach() - w[p], expected, rtol=1e-5, atol=1e-8)
    opt.restore()


def test_looksam_reuses_the_orthogonal_component_per_layer():
    """Between full steps: g_l + α ||g_l|| g_v,l / ||g_v,l||, with g_v the last full step's SAM
    gradient minus its projection on the gradient at W (Liu et al., per layer)."""
    torch.manual_seed(6)
    m = prepared_mlp().double()
    opt = SAM(m.parameters(), torch.optim.SGD, lr=0.1, rho=0.2, every=2, reuse="looksam")
    assert opt.needs_ascent_gradient
    loss_fn(m).backward()
    g = {p: p.grad.clone() for p in m.parameters()}
    opt.first_step(zero_grad=True)
    loss_fn(m).backward()
    gs = {p: p.grad.clone() for p in m.parameters()}
    opt.second_step(zero_grad=True)
    assert not opt.needs_ascent_gradient and opt.param_groups[0]["sam_step"] == 1
    for p in m.parameters():
        gv = gs[p] - (gs[p] * g[p]).sum() / g[p].norm() ** 2 * g[p]
        torch.testing.assert_close(opt.base_optimizer.state[p]["looksam_direction"], gv)
        assert abs(float((gv * g[p]).sum())) < 1e-10 * float(gv.norm() * g[p].norm()) + 1e-20
    w = {p: p.detach().clone() for p in m.parameters()}
    opt.first_step()  # between full steps: nothing is perturbed
    assert all(torch.equal(p, w[p]) for p in m.parameters())
    loss_fn(m).backward()
    g2 = {p: p.grad.clone() for p in m.parameters()}
    lr = {id(p): grp["lr"] for grp in opt.param_groups for p in grp["params"]}
    opt.second_step()
    for p in m.parameters():
        d = opt.base_optimizer.state[p]["looksam_direction"]
        used = g2[p] + 0.7 * g2[p].norm() * d / d.norm()
        torch.testing.assert_close(p.detach(), w[p] - lr[id(p)] * used)


def test_every_k_without_reuse_takes_base_steps_between_full_steps():
    torch.manual_seed(7)
    m = prepared_mlp()
    ref = copy.deepcopy(m)
    mupp.reattach(ref)
    opt = SAM(m.parameters(), torch.optim.SGD, lr=0.1, rho=0.1, every=2)
    opt_ref = SAM(ref.parameters(), torch.optim.SGD, lr=0.1, rho=0.1)
    plan = []
    for i in range(4):
        plan.append(opt.needs_ascent_gradient)
        opt.step(closure_for(m))
        opt.zero_grad()
        if i % 2 == 0:
            opt_ref.step(closure_for(ref))
        else:  # the base step of the same param groups
            closure_for(ref)()
            opt_ref.base_optimizer.step()
        opt_ref.zero_grad()
    assert plan == [True, False, True, False]
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), ref.parameters()))


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_cheap_sam_resumes_bitwise_mid_cycle(plan):
    torch.manual_seed(8)
    a = prepared_mlp()
    opt = SAM(a.parameters(), torch.optim.SGD, lr=0.05, rho=0.1, momentum=0.9, **PLANS[plan])
    for _ in range(4):  # 4 steps of a cycle of 3: mid-cycle, LookSAM's direction kept
        manual_step(a, opt)
    sd = copy.deepcopy(opt.state_dict())
    b = copy.deepcopy(a)
    mupp.reattach(b)
    opt_b = SAM(b.parameters(), torch.optim.SGD, lr=0.05, rho=0.1, momentum=0.9, **PLANS[plan])
    opt_b.load_state_dict(sd)
    assert opt_b.needs_ascent_gradient == opt.needs_ascent_gradient
    for _ in range(5):
        manual_step(a, opt)
        manual_step(b, opt_b)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_cheap_sam_skips_a_nonfinite_step(plan):
    torch.manual_seed(9)
    m = prepared_mlp()
    opt = SAM(m.parameters(), torch.optim.SGD, lr=0.05, rho=0.1, momentum=0.9, **PLANS[plan])
    manual_step(m, opt)  # a full step (and momentum to perturb along)
    w = [p.detach().clone() for p in m.parameters()]
    state = copy.deepcopy(opt.base_optimizer.state_dict()["state"])

    def poison(model):
        model[2].weight.grad[0, 0] = float("nan")

    manual_step(m, opt, poison=poison)
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, w0) for p, w0 in zip(m.parameters(), w))
    after = opt.base_optimizer.state_dict()["state"]
    for i, st in state.items():
        assert all(torch.equal(t, after[i][k]) for k, t in st.items() if torch.is_tensor(t))


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_cheap_sam_gradscaler_path_equals_the_unscaled_one(plan):
    ref = prepared_mlp()
    scaled = copy.deepcopy(ref)
    mupp.reattach(scaled)
    kw = dict(lr=0.05, rho=0.1, momentum=0.9, **PLANS[plan])
    opt_ref = SAM(ref.parameters(), torch.optim.SGD, **kw)
    opt = SAM(scaled.parameters(), torch.optim.SGD, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for _ in range(5):
        manual_step(ref, opt_ref)
        manual_step(scaled, opt, scaler=scaler)
        scaler.update()
    assert scaler.get_scale() == 2.0**12
    for p, q in zip(ref.parameters(), scaled.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_looksam_keeps_every_gradient_for_last_layer_sam():
    """Last-layer SAM perturbs the readout, but every layer's SAM gradient changes: LookSAM
    keeps a direction for every parameter."""
    m = prepared_mlp()
    opt = SAM(
        m.parameters(),
        torch.optim.SGD,
        lr=0.1,
        rho=0.1,
        variant="last-layer",
        every=2,
        reuse="looksam",
    )
    opt.step(closure_for(m))
    assert all("looksam_direction" in opt.base_optimizer.state[p] for p in m.parameters())


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(every=0), "every must be a positive integer; got 0"),
        (dict(every=2.5), "every must be a positive integer; got 2.5"),
        (dict(every=True), "every must be a positive integer; got True"),
        (dict(ascent="momentum"), "ascent='momentum' .* SGD has momentum=0"),
        (dict(ascent="momentum", momentum=0.9, every=3), "use every=1 with it"),
        (dict(reuse="looksam"), "reuse='looksam' .* needs every=k with k >= 2"),
        (dict(reuse="look", every=2), "reuse must be one of"),
        (dict(ascent="adam"), "ascent must be one of"),
        (dict(reuse_scale=-1.0, every=2), "reuse_scale must be a non-negative finite number"),
    ],
)
def test_bad_cheap_sam_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        SAM(prepared_mlp().parameters(), torch.optim.SGD, lr=0.1, rho=0.1, **kw)


def test_momentum_sam_needs_a_momentum_mupp_can_read():
    m = prepared_mlp()
    with pytest.raises(ValueError, match="AdamW has betas\\[0\\]=0.0"):
        SAM(m.parameters(), torch.optim.AdamW, lr=0.1, rho=0.1, ascent="momentum", betas=(0.0, 0.9))
    with pytest.raises(ValueError, match="RMSprop has no momentum mupp knows how to read"):
        SAM(m.parameters(), torch.optim.RMSprop, lr=0.1, rho=0.1, ascent="momentum", momentum=0.9)
