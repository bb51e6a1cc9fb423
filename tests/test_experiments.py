"""Experiment suites end to end in --quick mode on a tiny IDX data set, and the data modules."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from autogrow.experiments import dead_units, suite_dnc, suite_grid, suite_net2net, suite_pays
from autogrow.experiments.data import DigitsDataModule, FashionMNISTDataModule, MNISTDataModule, read_idx, write_idx

import autogrow


def outputs(out, name):
    assert {p.name for p in out.iterdir()} >= {f"{name}.{ext}" for ext in ("csv", "json", "md", "png")}
    return json.loads((out / f"{name}.json").read_text())


def test_net2net_suite(tiny_idx, tmp_path):
    rows = suite_net2net.main(["--quick", "--data-dir", tiny_idx, "--out", str(tmp_path)])
    data = outputs(tmp_path, "net2net")
    assert len(rows) == len(data) == 5
    by = {r["model"]: r for r in rows}
    last = f"e{max(int(k[1:]) for k in by['(0) teacher'] if k.startswith('e') and k[1:].isdigit())}"
    teacher = by["(0) teacher"][last]
    # Function-preserving students start exactly where the teacher ended; the baselines do not.
    assert abs(by["(2) net2wider"]["e0"] - teacher) < 1e-4 and abs(by["(4) net2deeper"]["e0"] - teacher) < 1e-4
    assert abs(by["(1) wider random-pad"]["e0"] - teacher) > 1e-3
    assert "| (2) net2wider |" in (tmp_path / "net2net.md").read_text()


def test_grid_suite(tiny_idx, tmp_path):
    rows = suite_grid.main(["--quick", "--data-dir", tiny_idx, "--out", str(tmp_path)])
    outputs(tmp_path, "grid")
    assert [r["kind"] for r in rows].count("grid") == 4 and [r["kind"] for r in rows].count("net2net") == 4
    assert all(r["train_flops"] > 0 for r in rows)
    assert next(r for r in rows if r["kind"] == "growth")["events"] >= 1
    early = next(r for r in rows if r["kind"] == "growth by 5%")  # at the cap: the largest grid net's size
    largest = next(r for r in rows if (r["kind"], r["h1"], r["h2"]) == ("grid", 16, 16))
    assert (early["h1"], early["h2"], early["params"]) == (16, 16, largest["params"])
    assert [r["kind"] for r in rows].count("resize") == 1
    md = (tmp_path / "grid.md").read_text()
    assert md.count("Target (within 0.3 pp") == 3 and "| resize (ends " in md


def test_grid_net2net_rows_carry_adam_state(tiny_idx):
    """The widened student starts with the base run's Adam moments, re-indexed to its new width."""
    from autogrow.experiments.common import fashion, train
    from autogrow.experiments.models import MLP, Classifier
    from pytorch_lightning.callbacks import Callback

    args = suite_grid.parser("", 1, 1).parse_args(["--quick", "--data-dir", tiny_idx])
    suite_grid.finish_args(args, "grid")
    dm, kept = fashion(args), suite_grid.KeepOptimizer()
    base = Classifier(MLP(784, [4, 4]), optimizer="adam", lr=1e-3)
    train("base", base, dm, 1, [kept])
    steps = float(kept.state["state"][0]["step"])
    module = Classifier(base.model, optimizer="adam", lr=1e-3)
    growth = autogrow.widen(module, "model.fc1", 8, split=0.5, generator=0)
    seen = {}

    class Look(Callback):
        def on_train_start(self, trainer, pl_module):
            state = trainer.optimizers[0].state[pl_module.model.fc1.weight]
            seen["shape"], seen["step"] = tuple(state["exp_avg"].shape), float(state["step"])

    train("student", module, dm, 1, [suite_grid.CarryOptimizer(kept, [growth]), Look()])
    assert seen == {"shape": (8, 784), "step": steps} and float(kept.state["state"][0]["step"]) == steps  # copied


def test_pays_and_dnc_suites(tiny_idx, tmp_path):
    rows = suite_pays.main(["--quick", "--data-dir", tiny_idx, "--out", str(tmp_path / "pays"), "--seeds", "2",
                            "--ablation"])
    configs = {r["config"] for r in rows}
    assert {"grown", "scratch", "scratch @ budget"} <= configs and set(suite_pays.ABLATIONS) <= configs
    grown = [r for r in rows if r["config"] == "grown"]
    assert all(r["events"] >= 1 and 0 < r["flops_ratio"] < 1 for r in grown)  # it grew, for less than scratch
    assert "Target (grown >= scratch - 0.1 pp)" in (tmp_path / "pays" / "pays_mlp.md").read_text()
    variant = suite_pays.main(["--quick", "--data-dir", tiny_idx, "--out", str(tmp_path / "pays"), "--seeds", "2",
                               "--variant", "copies"])  # paired with the run above, seed by seed
    saved = {r["seed"]: r["test_acc"] for r in rows if r["config"] == "scratch"}
    assert [round(r["d_scratch_pp"], 9) for r in variant] == [round(100 * (r["test_acc"] - saved[r["seed"]]), 9)
                                                               for r in variant]
    at_baselines_lr = (tmp_path / "pays" / "pays_mlp_copies.json").read_text()
    suite_pays.main(["--quick", "--data-dir", tiny_idx, "--out", str(tmp_path / "pays"), "--seeds", "1",
                     "--variant", "copies", "--lrs", "3e-3"])  # another LR than the baselines': its own files
    assert (tmp_path / "pays" / "pays_mlp_copies.json").read_text() == at_baselines_lr  # not overwritten
    assert "at peak LR 0.003" in (tmp_path / "pays" / "pays_mlp_copies_lr0.003.md").read_text()
    suite_pays.main(["--quick", "--data-dir", tiny_idx, "--out", str(tmp_path / "pays"), "--seeds", "2",
                     "--variant", "deadline-0.3"])
    sweep = {r["config"]: r for r in suite_pays.main(["--quick", "--out", str(tmp_path / "pays"), "--deadline-sweep"])}
    assert list(sweep)[:2] == ["grown, deadline 0.3", "grown, deadline 0.6"]  # no defaults variant: the saved run
    assert sweep["grown, deadline 0.6"]["test_acc"] == sum(r["test_acc"] for r in grown) / len(grown)
    assert "| scratch @ budget |" in (tmp_path / "pays" / "pays_mlp_deadline_sweep.md").read_text()
    front = suite_pays.main(["--quick", "--data-dir", tiny_idx, "--out", str(tmp_path / "pays"), "--seeds", "2",
                             "--frontier", "0.5", "--lrs", "1e-3"])  # every fixed width on half scratch's FLOPs
    assert [r["config"] for r in front] == ["fixed 2", "fixed 4", "fixed 8"]  # --quick: the start, others, final
    assert all(abs(r["flops_ratio"] - 0.5) < 0.1 for r in front)
    report = (tmp_path / "pays" / "pays_mlp_frontier_0.5.md").read_text()
    assert "seeds at the target" in report
    assert f"suite_pays --quick --model mlp --frontier 0.5 --lrs 0.001 --out {tmp_path / 'pays'}`" in report
    suite_dnc.main(["--quick", "--data-dir", tiny_idx, "--out", str(tmp_path / "dnc")])
    assert outputs(tmp_path / "dnc", "dnc")


def test_dead_units_are_counted_by_birth():
    """A unit whose bias keeps its ReLU off is dead; the counts split by the units' birth (original 32, then each
    growth's) and the fit on the given data is measured."""
    from autogrow.experiments.models import MLP, Classifier

    torch.manual_seed(0)
    module = Classifier(MLP(784, [64, 64]))
    x, y = torch.rand(256, 784), torch.randint(0, 10, (256,))
    before = dead_units.measure(module, x, y)
    with torch.no_grad():
        alive = torch.nonzero(module.model.act1(module.model.fc1(x)).amax(0)[32:] > 0).flatten()[:8] + 32
        module.model.fc1.bias[alive] = -1e3  # 8 living units born at the first growth, killed
    m = dead_units.measure(module, x, y)
    assert len(alive) == 8
    assert m["act1"]["dead_by_birth"]["0-32"] == before["act1"]["dead_by_birth"]["0-32"]
    assert m["act1"]["dead_by_birth"]["32-64"] == before["act1"]["dead_by_birth"]["32-64"] + 0.25
    assert 0 <= m["train_acc"] <= 1 and m["train_loss"] > 0 and 1 <= m["act2"]["rank99"] <= 64


def test_idx_round_trip_and_errors(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a-idx3-ubyte.gz", arr)
    assert np.array_equal(read_idx(tmp_path / "a-idx3-ubyte.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short")


def test_idx_data_module_finds_files_and_says_where_to_put_them(tiny_idx, tmp_path):
    dm = FashionMNISTDataModule(data_dir=tiny_idx, val_size=0.25, batch_size=16, seed=1)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 784) and y.dtype == torch.long
    assert len(dm._splits["train"]) == 300 and len(dm._splits["val"]) == 100 and len(dm._splits["test"]) == 100
    again = FashionMNISTDataModule(data_dir=tiny_idx, val_size=0.25, seed=1)
    again.setup()
    assert torch.equal(again._splits["val"].tensors[1], dm._splits["val"].tensors[1])  # seeded split
    cnn = FashionMNISTDataModule(data_dir=tiny_idx, val_size=0.25, flatten=False)
    assert cnn.input_shape == (1, 28, 28)
    missing = MNISTDataModule(data_dir=str(tmp_path))
    missing.debian_dir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="were not found in .*Put them in data_dir.*download=True"):
        missing.setup()


def test_digits_data_module():
    dm = DigitsDataModule(batch_size=32, val_size=0.2)
    dm.setup()
    assert dm.input_shape == (64,)
    assert len(dm._splits["test"]) == 1797 // 5
    assert len(dm._splits["train"]) + len(dm._splits["val"]) == 1797 - 1797 // 5


def test_screen_grows_on_schedule_and_counts_flops(tiny_idx, tmp_path):
    """The plain-PyTorch screen: every recipe runs; the FLOPs follow the schedule exactly (15 steps, growths at
    steps 3/6/9, each doubling both hidden layers; the probes' single jumps), the budget baseline trains 0.55x
    the steps."""
    from autogrow.experiments import screen

    rows = screen.main(["--quick", "--data-dir", tiny_idx, "--out", str(tmp_path)])
    assert {r["recipe"] for r in rows} == set(screen.RECIPES)
    assert "| even 0.6 (default) |" in (tmp_path / "screen_mlp_3ep.md").read_text()
    m, x = screen.MODELS["mlp"], torch.zeros(1, 784)
    f = {w: screen.forward_flops(m.build(w), x) for w in (32, 64, 128, 256)}
    by = {r["recipe"]: r["flops"] for r in rows}
    assert by["scratch"] == pytest.approx(1.0) and by["scratch on 0.55x steps"] == pytest.approx(8 / 15)
    assert by["even 0.6 (default)"] == pytest.approx((3 * (f[32] + f[64] + f[128]) + 6 * f[256]) / (15 * f[256]))
    assert by["half width"] == pytest.approx(f[128] / f[256])
    # Probes: one jump 32 -> 256 at step 2 (10% of 15 steps, rounded); half width, one jump at step 10 (70%).
    assert by["one jump at 10%"] == pytest.approx((2 * f[32] + 13 * f[256]) / (15 * f[256]))
    assert by["half width then one jump at 70%"] == pytest.approx((10 * f[128] + 5 * f[256]) / (15 * f[256]))


def test_screen_shrink_perturb_only_at_the_last_growth():
    from autogrow.experiments import screen

    m, x = screen.MODELS["mlp"], torch.randn(16, 784)
    r = screen.RECIPES["geometric 0.7 + shrink-perturb 0.2/0.01 at the last growth"]
    torch.manual_seed(0)
    net = m.build(32)
    opt = torch.optim.Adam(net.parameters())
    before = net(x)
    screen.grow(net, m, r, opt, x, seed=0, step=1, last=False)  # exact: widened, not perturbed
    assert net.fc1.out_features == 64 and (net(x) - before).abs().max() < 1e-5
    assert net.out.weight[:, 32:].abs().max() == 0 < net.fc2.weight[32:].abs().min()  # fresh units, as the callback
    screen.grow(net, m, r, opt, x, seed=0, step=2, last=True)
    assert net.fc1.out_features == 128 and (net(x) - before).abs().max() > 0.1


def test_screen_cooling_and_adam_state_probes():
    """The small phase's probes: cooling scales the logits exactly (the predictions kept) after the exact growth;
    ``new_state="mean"`` starts the fresh units' second moments at the old units' mean instead of 0."""
    import torch.nn.functional as F
    from autogrow.experiments import screen

    m, x, y = screen.MODELS["mlp"], torch.randn(16, 784), torch.randint(0, 10, (16,))
    for name, state in (("even 0.6 + logits cooled x0.1", "zero"),
                        ("one jump at 10% + Adam state at the old units' mean", "mean")):
        torch.manual_seed(0)
        net = m.build(32)
        opt = torch.optim.Adam(net.parameters())
        F.cross_entropy(net(x), y).backward()
        opt.step()
        before = net(x)
        screen.grow(net, m, screen.RECIPES[name], opt, x, seed=0, step=1, last=True)
        after = net(x)
        cool = screen.RECIPES[name].cool or 1.0
        assert net.fc1.out_features == 64 and (after - cool * before).abs().max() < 1e-5
        assert torch.equal(after.argmax(1), before.argmax(1))
        fresh_v = opt.state[net.fc2.weight]["exp_avg_sq"][32:]
        assert (fresh_v.abs().max() > 0) == (state == "mean")


def test_screen_lr_rule_is_growth_lrs():
    """The screen's default and held LR multipliers are GrowthLR's rule without its re-warm (the decay starts no
    earlier than the latest growth so far; held: than the last one), step by step."""
    from autogrow.experiments import screen

    from autogrow.lr import GrowthLR

    total, points = 50, [5, 20, 35]
    for recipe, hold in ((screen.Recipe(), False), (screen.Recipe(hold=True), True)):
        lr = GrowthLR(decay=recipe.decay, rewarm=0, total_steps=total)
        for t in range(total):
            done = [p for p in points if p <= t]
            lr.last_growth = points[-1] if hold else (done[-1] if done else None)
            assert screen.multiplier(recipe, t, total, points) == pytest.approx(lr.multiplier(t), abs=1e-12)
