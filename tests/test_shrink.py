"""Shrinking: exact merges of duplicate units (the inverse of widening), approximate pruning with a
least-squares correction, the inverse optimizer-state rule, refusals, records and replay."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autogrow
from autogrow.plan import outputs, relative_error
from autogrow.registry import layer_spec
from tests.models import CatNet, TinyGPT, TinyResNet, TinyTransformer, conv_nd, max_rel_error
from tests.test_optim import OPTIMIZERS, X, batches, loss_of, teacher
from tests.test_refusals import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("float64")  # exactness is checked to 1e-9: models and data in float64


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and BatchNorm statistics (a wrongly merged entry shows), from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def mlp_bn() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))


def gen_input(shape: tuple[int, ...], seed: int = 3) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# (name, model, target, widened width, input)
EXACT = [
    ("mlp-batchnorm", mlp_bn, "0", 9, (6, 5)),
    ("resnet-stream", lambda: TinyResNet(c=4), "stem", 7, (3, 3, 6, 6)),
    ("resnet-block", lambda: TinyResNet(c=4), "layer1.0.conv1", 6, (3, 3, 6, 6)),
    ("cat-first", CatNet, "a", 6, (2, 2, 8, 8)),
    ("cat-second", CatNet, "b", 9, (2, 2, 8, 8)),
    ("conv1d-flatten", lambda: conv_nd(1), "3", 7, (2, 2, 4)),
    ("conv2d-flatten", lambda: conv_nd(2), "3", 6, (2, 2, 4, 4)),
    ("conv3d-batchnorm", lambda: conv_nd(3, bias=False), "0", 5, (2, 2, 4, 4, 4)),
    ("transformer-layernorm", TinyTransformer, "emb", 12, None),
    ("attention-heads", TinyGPT, "blocks.0.attn.q", 15, None),  # 2 heads of 3 -> 5 -> 2
]


def example(shape: tuple[int, ...] | None) -> torch.Tensor:
    return torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(3)) if shape is None \
        else gen_input(shape)


@pytest.mark.parametrize("name, build, target, width, shape", EXACT, ids=[e[0] for e in EXACT])
@pytest.mark.parametrize("split", [0.0, 0.3])
def test_widen_then_merge_returns_the_original(name, build, target, width, shape, split):
    """Same function to 1e-9 (eval and train mode), same parameter shapes, same values up to rounding."""
    model = randomize(build(), 0)
    original = copy.deepcopy(model)
    x = example(shape)
    autogrow.widen(model, target, width, split=split, generator=1, example_inputs=x)
    plan = autogrow.plan_shrink(model, target, example_inputs=x)
    spec = layer_spec(original.get_submodule(target))
    assert plan.exact and plan.width == getattr(original.get_submodule(target), spec.out_attr)
    growth = plan.apply()
    assert growth.kind == "shrink"
    for train in (False, True):
        a, b = copy.deepcopy(original).train(train), copy.deepcopy(model).train(train)
        with torch.no_grad():
            assert max_rel_error(a(x), b(x)) <= 1e-9, train
    before, after = original.state_dict(), model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].shape == after[k].shape, k
        assert torch.allclose(before[k].double(), after[k].double(), rtol=0, atol=1e-12), k
    assert repr(model) == repr(original)


def widened_mlp(width: int = 8, split: float = 0.3) -> tuple[nn.Module, torch.Tensor]:
    model = randomize(nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)), 0)
    x = gen_input((7, 5))
    autogrow.widen(model, "0", width, split=split, generator=2, example_inputs=x)
    return model, x


def test_partial_merges_reach_every_width_down_to_the_distinct_units():
    model, x = widened_mlp(8)  # 4 distinct units, 4 copies
    ref = model(x)
    for width in (7, 6, 5, 4):
        plan = autogrow.plan_shrink(model, "0", width, example_inputs=x)
        plan.apply()
        assert model[0].out_features == width
        assert max_rel_error(ref, model(x)) <= 1e-9
    with pytest.raises(autogrow.AutogrowError, match="has no duplicate units to merge"):
        autogrow.plan_shrink(model, "0")


def test_the_most_recent_copies_merge_first():
    """A partial merge keeps the lowest-numbered units (the older ones), each copy merged into its group's
    first member; a copy of a copy is indistinguishable from a copy, so consumer columns may be regrouped."""
    model, x = widened_mlp(6)
    widened = copy.deepcopy(model)
    ref = model(x)
    autogrow.widen(model, "0", 9, generator=5, example_inputs=x)
    autogrow.shrink(model, "0", 6, example_inputs=x)
    assert torch.equal(model[0].weight, widened[0].weight) and torch.equal(model[0].bias, widened[0].bias)
    assert max_rel_error(ref, model(x)) <= 1e-9


def test_plan_prints_every_tensor_and_param_delta_is_exact():
    model, x = widened_mlp(8)
    plan = autogrow.plan_shrink(model, "0")
    text = str(plan)
    assert text.startswith("ShrinkPlan: '0' 8 -> 4 units (mode=merge")
    for name in ("0.weight: [8, 5] -> [4, 5] (dim 0 merge)", "0.bias: [8] -> [4] (dim 0 merge)",
                 "2.weight: [3, 8] -> [3, 4] (dim 1 sum)",
                 "merges 3 groups of copied units: [[0, 4, 7], [1, 6], [3, 5]]"):
        assert name in text
    before = autogrow.num_params(model)
    g = plan.apply()
    assert plan.param_delta == autogrow.num_params(model) - before == -4 * (5 + 1 + 3)
    assert g.summary() == "shrink 0: 8 -> 4 units (merge), 3 parameters changed"


def test_tied_parameters_shrink_together():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.out = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)
            self.b.weight = self.a.weight  # one Parameter, two producers of one residual sum

        def forward(self, x):
            return self.out(torch.relu(self.a(x) + self.b(x)))

    model = randomize(Tied(), 0)
    x = gen_input((5, 3))
    ref = model(x)
    autogrow.widen(model, "a", 7, split=0.2, generator=0, example_inputs=x)
    autogrow.shrink(model, "a", example_inputs=x)
    assert model.a.weight is model.b.weight and model.a.weight.shape == (4, 3)
    assert max_rel_error(ref, model(x)) <= 1e-9


# --- refusals: named, and nothing changes ------------------------------------------------------------

def mlp() -> nn.Module:
    return randomize(nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 3)), 0)


REFUSALS = [
    (mlp, lambda m: autogrow.plan_shrink(m, "0"), r"target: '0' has no duplicate units to merge"),
    (lambda: widened_mlp(8)[0], lambda m: autogrow.plan_shrink(m, "0", 3),
     r"width: 3 is not allowed; expected at least 4: '0' has 4 distinct units"),
    (lambda: widened_mlp(8)[0], lambda m: autogrow.plan_shrink(m, "0", 8),
     r"width: 8 is not allowed; expected fewer than '0'.s current 8 units"),
    (mlp, lambda m: autogrow.plan_shrink(m, "2"), r"cannot shrink '2' exactly: node 'output'.*Shrink a hidden layer"),
    (mlp, lambda m: autogrow.plan_shrink(m, "nope"), r"target: 'nope' is not a module"),
    (mlp, lambda m: autogrow.plan_shrink(m, "0", mode="cut"), r"mode: 'cut' is not allowed; expected one of"),
    (mlp, lambda m: autogrow.plan_shrink(m, "0", 0), r"width: 0 is not allowed; expected an int >= 1"),
    (mlp, lambda m: autogrow.plan_shrink(m, "0", tol=-1.0), r"tol: -1.0 is not allowed; expected a number >= 0"),
    (mlp, lambda m: autogrow.plan_shrink(m, "0", correct="yes"), r"correct: 'yes' is not allowed; expected True"),
    (mlp, lambda m: autogrow.plan_shrink(m, "0", 3, mode="prune", ridge=-0.1, example_inputs=gen_input((4, 5))),
     r"ridge: -0.1 is not allowed; expected a number >= 0"),
    (mlp, lambda m: autogrow.plan_shrink(m, "0", 3, mode="prune", select="qr", example_inputs=gen_input((4, 5))),
     r"select: 'qr' is not allowed; expected one of \('span', 'magnitude'\)"),
    (mlp, lambda m: autogrow.plan_shrink(m, "0", mode="prune", example_inputs=gen_input((4, 4))),
     r"width: None is not allowed; expected an int >= 1 \(mode='prune'"),
    (mlp, lambda m: autogrow.plan_shrink(m, "0", 3, mode="prune"),
     r"example_inputs: None is not allowed; expected a batch"),
    (mlp, lambda m: autogrow.plan_shrink(m, "0", 3, mode="prune", example_inputs=gen_input((4, 7))),
     r"example_inputs: the model's forward failed"),
    (lambda: randomize(TinyGPT(), 0),
     lambda m: autogrow.plan_shrink(m, "blocks.0.attn.q", 4, mode="prune", example_inputs=example(None)),
     r"heads of 3: the new width 4 is not a whole number of heads. Shrink to a multiple of 3"),
]


@pytest.mark.parametrize("build, call, message", REFUSALS)
def test_refusal_names_the_problem_and_changes_nothing(build, call, message):
    model = build()
    before = snapshot(model)
    with pytest.raises(autogrow.AutogrowError, match=message):
        call(model)
    assert_unchanged(before, model)


def test_layernorm_needs_every_unit_merged_equally():
    model = randomize(TinyTransformer(), 0)
    x = example(None)
    autogrow.widen(model, "emb", 12, generator=0, example_inputs=x)  # uniform: every unit twice
    before = snapshot(model)
    with pytest.raises(autogrow.AutogrowError, match=r"width: merging 'emb' to 9 units leaves 'blocks.0.ln'"):
        autogrow.plan_shrink(model, "emb", 9, example_inputs=x)
    assert_unchanged(before, model)


def trained(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, steps: int = 2) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_refusals_with_an_optimizer_leave_model_and_state_unchanged():
    model, x = widened_mlp(8, split=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    trained(model, opt, x)  # even shares: the copies stay copies (up to rounding)
    before = snapshot(model, opt)
    for call, message in [
        (lambda: autogrow.shrink(model, "0", 2, optimizer=opt), r"width: 2 is not allowed"),
        (lambda: autogrow.shrink(model, "0", optimizer=opt, state="keep"), r"state: 'keep' is not allowed"),
        # Merging units that are not copies changes the function: verified on the batch and undone.
        (lambda: autogrow.shrink(model, "0", optimizer=opt, tol=10.0, example_inputs=x),
         r"changed the model's output by .* the growth was undone"),
    ]:
        with pytest.raises(autogrow.AutogrowError, match=message):
            call()
        assert_unchanged(before, model, opt)
    lbfgs = torch.optim.LBFGS(model.parameters())
    with pytest.raises(autogrow.AutogrowError, match="optimizer: LBFGS keeps its history"):
        autogrow.shrink(model, "0", optimizer=lbfgs)
    assert_unchanged(before, model, opt)


# --- the optimizer state: the inverse of the widening rule, checked against gradient histories --------

def state_error(carried: dict, own: dict, name: str) -> float:
    """Largest relative difference between two states of one parameter (asserting they agree on keys/counts)."""
    assert carried.keys() == own.keys(), name
    err = 0.0
    for k, b in own.items():
        a = carried[k]
        if isinstance(b, torch.Tensor) and b.dim() > 0:
            assert a.shape == b.shape, f"{name}.{k}"
            err = max(err, float((a - b).abs().max() / b.abs().max().clamp_min(1e-300)))
        else:
            assert float(a) == float(b), f"{name}.{k}"
    return err


def history_state(make, shaped_like: nn.Module, nets: list[nn.Module], data: list) -> torch.optim.Optimizer:
    """An optimizer over ``shaped_like``'s parameters holding the state built by ``nets[i]``'s own gradients on
    ``data[i]``, one step each (stepped on stand-ins: ``shaped_like`` itself is not moved)."""
    stand_ins = [nn.Parameter(torch.zeros_like(p)) for p in shaped_like.parameters()]
    ref = make(stand_ins)
    for net, b in zip(nets, data):
        for p, g in zip(stand_ins, torch.autograd.grad(loss_of(net, b), list(net.parameters()))):
            p.grad = g
        ref.step()
    opt = make(list(shaped_like.parameters()))
    opt.load_state_dict(ref.state_dict())
    return opt


def replayed(net: nn.Module, records: list[autogrow.Growth]) -> nn.Module:
    net = copy.deepcopy(net)
    autogrow.replay(net, records)
    return net


def merge_back(wide: nn.Module, opt: torch.optim.Optimizer | None) -> list[autogrow.Growth]:
    return [autogrow.shrink(wide, "3", optimizer=opt), autogrow.shrink(wide, "0", optimizer=opt, example_inputs=X)]


MERGE_TOL = 1e-9  # measured worst case: ~1e-13 (see the report); Adamax/RMSprop's eps terms are made negligible


@pytest.mark.parametrize("split", [0.0, 0.4])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_merged_state_is_the_teachers_own(name, split):
    """Teacher T trained 6 steps; W = T widened (exact copies, shares s_j), with the state W's own gradient
    history (the widened snapshots of T) builds. Merging W's copies gives T's parameters and T's own state."""
    make = OPTIMIZERS[name]
    net, data = teacher(), batches(6)
    opt = make(net.parameters())
    snapshots = []
    for b in data:
        snapshots.append(copy.deepcopy(net))
        opt.zero_grad()
        loss_of(net, b).backward()
        opt.step()
    wide = copy.deepcopy(net)
    growths = [autogrow.widen(wide, "0", 10, split=split, generator=7, example_inputs=X),
               autogrow.widen(wide, "3", 7, split=split, generator=8)]
    wide_opt = history_state(make, wide, [replayed(s, growths) for s in snapshots], data)
    merge_back(wide, wide_opt)
    params = dict(wide.named_parameters())
    for n, q in net.named_parameters():
        assert params[n].shape == q.shape and torch.allclose(params[n], q, rtol=0, atol=1e-12), n
        assert state_error(wide_opt.state[params[n]], opt.state[q], n) <= MERGE_TOL, f"{name} {n}"


@pytest.mark.parametrize("name", ["sgd-momentum", "adam", "rmsprop-centered-momentum", "adagrad", "adamax"])
def test_copies_trained_together_merge_into_their_own_history(name):
    """Copies made with even shares stay copies while training (same gradients, same state). Merged, the
    state must be what the merged network's own gradient history builds: the teacher's steps before the
    widening, then the merged snapshots of the wide network."""
    make = OPTIMIZERS[name]
    net, data = teacher(), batches(8)
    opt = make(net.parameters())
    nets = []
    for i, b in enumerate(data):
        if i == 4:
            growths = [autogrow.widen(net, "0", 10, optimizer=opt, generator=7, example_inputs=X),
                       autogrow.widen(net, "3", 7, optimizer=opt, generator=8)]
        nets.append(copy.deepcopy(net))
        opt.zero_grad()
        loss_of(net, b).backward()
        opt.step()
    assert len(growths) == 2
    records = merge_back(net, opt)  # merges the copies (equal up to rounding: the default tol)
    merged = [n if i < 4 else replayed(n, records) for i, n in enumerate(nets)]
    own = history_state(make, net, merged, data)
    for n, p in net.named_parameters():
        assert state_error(opt.state[p], own.state[p], n) <= MERGE_TOL, f"{name} {n}"


def test_second_moments_need_the_square_of_summed_roots():
    """Adam's exp_avg_sq of copies with shares s_j is s_j**2 v: summing them gives sum_j s_j**2 v (half, for two
    even copies), the rule's (sum_j sqrt(v_j))**2 gives v; the first moments simply add up."""
    net = teacher()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for b in batches(2):
        opt.zero_grad()
        loss_of(net, b).backward()
        opt.step()
    st = {k: v.clone() for k, v in opt.state[net[0].weight].items()}
    autogrow.widen(net, "0", 12, mapping="uniform", optimizer=opt, generator=0, example_inputs=X)
    wide = {k: v.clone() for k, v in opt.state[net[0].weight].items()}
    assert torch.allclose(wide["exp_avg_sq"][:6] + wide["exp_avg_sq"][6:], st["exp_avg_sq"] / 2)
    autogrow.shrink(net, "0", optimizer=opt, example_inputs=X)
    back = opt.state[net[0].weight]
    assert torch.allclose(back["exp_avg_sq"], st["exp_avg_sq"], rtol=1e-12, atol=0)
    assert torch.allclose(back["exp_avg"], st["exp_avg"], rtol=1e-12, atol=0)
    assert int(back["step"]) == int(st["step"])


def test_rebuilt_optimizer_gets_the_same_state_by_name():
    """translate_state_dict (rebuild path) and the live optimizer (in place) agree after a shrink."""
    results = []
    for path in ("in-place", "rebuild"):
        net = teacher()
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        data = batches(4)
        for b in data[:2]:
            opt.zero_grad()
            loss_of(net, b).backward()
            opt.step()
        autogrow.widen(net, "0", 9, optimizer=opt, split=0.3, generator=3, example_inputs=X)
        if path == "in-place":
            autogrow.shrink(net, "0", optimizer=opt, example_inputs=X)
        else:
            saved, names = opt.state_dict(), autogrow.param_names(opt, net)
            g = autogrow.shrink(net, "0", example_inputs=X)
            opt = torch.optim.Adam(net.parameters(), lr=1e-2)
            autogrow.translate_state_dict(saved, names, [g], opt, net)
        for b in data[2:]:
            opt.zero_grad()
            loss_of(net, b).backward()
            opt.step()
        results.append([p.detach().clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


# --- pruning: approximate, corrected by least squares ----------------------------------------------

def over_wide_mlp() -> tuple[nn.Module, torch.Tensor]:
    """An MLP with far more hidden units than its random-regression task needs, trained briefly."""
    gen = torch.Generator().manual_seed(0)
    model = randomize(nn.Sequential(nn.Linear(6, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 3)), 1)
    x, y = torch.randn(128, 6, generator=gen), torch.randn(128, 3, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    return model, x


@pytest.mark.parametrize("target", ["0", "2"])
def test_least_squares_correction_reduces_the_output_change(target):
    model, x = over_wide_mlp()
    before = snapshot(model)
    corrected = autogrow.plan_shrink(model, target, 24, mode="prune", example_inputs=x)
    plain = autogrow.plan_shrink(model, target, 24, mode="prune", correct=False, example_inputs=x)
    assert_unchanged(before, model)  # measuring the error tried each plan and put everything back
    assert not corrected.exact and corrected.param_delta == plain.param_delta < 0
    assert 0 < corrected.error < plain.error, (corrected.error, plain.error)
    assert "least-squares correction" in str(corrected) and "least-squares" not in str(plain)
    ref = outputs(model, x)
    n = autogrow.num_params(model)
    g = corrected.apply()
    assert autogrow.num_params(model) - n == corrected.param_delta
    assert relative_error(ref, outputs(model, x)) == pytest.approx(corrected.error, rel=1e-12)
    assert g.options["error"] == corrected.error and g.options["mode"] == "prune"
    assert f"output change {corrected.error:.3g}" in g.summary()


def test_pruning_the_last_hidden_layer_projects_exactly():
    """With the output layer as the consumer, the corrected output is the least-squares projection of the old
    output onto the kept units and a constant: the residual is orthogonal to them."""
    model, x = over_wide_mlp()
    ref = model(x).detach()
    g = autogrow.shrink(model, "2", 24, mode="prune", example_inputs=x)
    with torch.no_grad():
        h = model[3](model[2](model[1](model[0](x))))
        residual = ref - model(x)
    design = torch.cat([h, torch.ones(len(h), 1)], dim=1)
    assert float((design.T @ residual).abs().max()) <= 1e-9 * float(design.norm() * residual.norm())
    assert float(residual.norm()) > 0.01 * float(ref.norm())  # not trivially exact: units were lost
    assert g.options["correct"] is True


def test_ridge_correction_solves_the_penalised_normal_equations():
    """Pruning the last hidden layer with ``ridge``: the change of the output layer's kept weights and bias
    (the removed features' regression folded in) solves ``(D^T D + P) delta = D^T A_removed W_removed^T``, D the
    kept activations and a ones column, ``P = ridge * mean(diag(D^T D))`` on the features and 0 on the constant:
    ridge regression of the lost part of the output, penalising the change to the kept weights."""
    model, x = over_wide_mlp()
    with torch.no_grad():
        h = model[3](model[2](model[1](model[0](x))))
    w_old, b_old = model[4].weight.detach().clone(), model[4].bias.detach().clone()
    g = autogrow.shrink(model, "2", 24, mode="prune", ridge=0.1, example_inputs=x)
    assert g.options["ridge"] == 0.1 and "ridge=0.1" in str(autogrow.plan_shrink(
        copy.deepcopy(model), "2", 20, mode="prune", ridge=0.1, example_inputs=x))
    keep = ~g.maps["base"].fresh
    design = torch.cat([h[:, keep], torch.ones(len(h), 1)], dim=1)
    gram = design.T @ design
    penalty = torch.full((len(gram),), 0.1 * float(gram.diagonal().mean()))
    penalty[-1] = 0.0
    delta = torch.cat([model[4].weight.T - w_old[:, keep].T, (model[4].bias - b_old)[None]]).detach()
    lhs, rhs = (gram + torch.diag(penalty)) @ delta, design.T @ (h[:, ~keep] @ w_old[:, ~keep].T)
    assert float((lhs - rhs).abs().max()) <= 1e-9 * float(rhs.abs().max())


def test_ridge_keeps_a_square_fit_from_failing_on_new_inputs():
    """About as many kept features as fit samples: plain least squares matches the fit batch and is far off on
    held-out inputs; the ridge correction is closer there (the reason Shrink defaults to ``ridge=1e-2``)."""
    model, x = over_wide_mlp()
    fit, held = x[:30], x[64:]
    ref = outputs(model, held)
    errors = {}
    for ridge in (0.0, 1e-2):
        trial = copy.deepcopy(model)
        # magnitude selection: the ridge's effect alone (span selection also lowers both errors)
        autogrow.shrink(trial, "2", 28, mode="prune", ridge=ridge, example_inputs=fit, select="magnitude")
        errors[ridge] = relative_error(ref, outputs(trial, held))
    assert errors[1e-2] < 0.5 * errors[0.0], errors


def test_span_selection_keeps_one_of_each_group_of_near_copies():
    """Widening leaves near-copies (here 3 units, each copied 3 times, incoming weights then nudged by 1e-7):
    pruning back to 3 with ``select="span"`` keeps one unit of each group, and the least-squares correction
    rebuilds the function to the nudge's size; selecting by magnitude keeps several of one group."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    x = torch.randn(64, 4, dtype=torch.float64)
    grown = autogrow.widen(net, "0", 9, init="net2wider", split=0.0, generator=0)
    group = grown.maps["base"].idx
    with torch.no_grad():
        net[0].weight += 1e-7 * torch.randn(9, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref, errors = outputs(net, x), {}
    for select in ("span", "magnitude"):
        trial = copy.deepcopy(net)
        g = autogrow.shrink(trial, "0", 3, mode="prune", select=select, example_inputs=x)
        kept = torch.nonzero(~g.maps["base"].fresh).flatten()
        errors[select] = (relative_error(ref, outputs(trial, x)), sorted(group[kept].tolist()))
        assert g.options["select"] == select
    assert errors["span"][1] == [0, 1, 2] and errors["span"][0] < 1e-5, errors
    assert errors["magnitude"][1] != [0, 1, 2] and errors["magnitude"][0] > 1e-2, errors


PRUNED = [
    ("resnet-stream", lambda: TinyResNet(c=6), "stem", 3, (3, 3, 6, 6)),
    ("cat", CatNet, "b", 3, (2, 2, 8, 8)),
    ("conv-flatten", lambda: conv_nd(2), "3", 2, (2, 2, 4, 4)),
    ("conv-flatten-no-bias", lambda: conv_nd(2, bias=False), "3", 2, (2, 2, 4, 4)),
    ("attention-heads", TinyGPT, "blocks.1.attn.k", 3, None),  # 2 heads of 3 -> 1 head
]


@pytest.mark.parametrize("name, build, target, width, shape", PRUNED, ids=[p[0] for p in PRUNED])
def test_pruning_follows_the_coupling_and_the_optimizer(name, build, target, width, shape):
    model = randomize(build(), 0)
    x = example(shape)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    trained(model.train(), opt, x)
    shape = outputs(model, x)[0].shape
    g = autogrow.shrink(model, target, width, mode="prune", optimizer=opt, example_inputs=x)
    module = model.get_submodule(target)
    assert getattr(module, layer_spec(module).out_attr) == width
    assert outputs(model, x)[0].shape == shape
    for p in model.parameters():
        for v in opt.state[p].values():
            assert not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape == p.shape
    trained(model.train(), opt, x)  # the optimizer keeps working
    assert g.options["error"] >= 0


# --- records: JSON, replay bit for bit ----------------------------------------------------------------

@pytest.mark.parametrize("mode", ["merge", "prune"])
def test_replay_is_bit_identical_from_records_and_json(mode):
    model = randomize(CatNet(), 0)
    fresh = copy.deepcopy(model)
    x = gen_input((2, 2, 8, 8))
    records = [autogrow.widen(model, "a", 6, split=0.3, generator=1, example_inputs=x)]
    records.append(autogrow.shrink(model, "a", 4 if mode == "prune" else None, mode=mode, example_inputs=x))
    records.append(autogrow.shrink(model, "b", 3, mode="prune", example_inputs=x))
    for recs in (records, [json.loads(json.dumps(r.to_dict())) for r in records]):
        again = copy.deepcopy(fresh)
        autogrow.replay(again, recs)
        assert repr(again) == repr(model)
        for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
            assert torch.equal(a, b), k
    with pytest.raises(autogrow.AutogrowError, match="growths: the shrinking of 'a' does not fit"):
        autogrow.replay(copy.deepcopy(fresh), records[1:])  # without the widening it came from
