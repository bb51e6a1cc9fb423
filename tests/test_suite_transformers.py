"""The transformer benchmark: GPT and ViT grow exactly in every dimension; the suite runs end to end (--quick)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from autogrow.experiments import suite_transformers
from autogrow.experiments.transformers import GPT, CharDataModule, SelfAttention, ViT, forward_flops

import autogrow
from autogrow.actions import Stack, Widen, discover_targets
from tests.models import max_rel_error

SMALL = {"d": 8, "heads": 1, "head_size": 4, "hidden": 16, "layers": 1}


def gpt_and_input() -> tuple[torch.nn.Module, torch.Tensor, str]:
    idx = torch.randint(0, 13, (3, 12), generator=torch.Generator().manual_seed(0))
    return GPT(vocab=13, context=12, **SMALL), idx, "tok"


def vit_and_input() -> tuple[torch.nn.Module, torch.Tensor, str]:
    return ViT(**SMALL), torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)), "embed"


def trained(make):
    torch.manual_seed(0)
    net, x, stream = make()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        out = net(x)
        loss = F.cross_entropy(out.flatten(0, 1), x.flatten()) if out.dim() == 3 else out.square().mean()
        loss.backward()
        opt.step()
    return net, opt, x, stream


@pytest.mark.parametrize("make", [gpt_and_input, vit_and_input], ids=["gpt", "vit"])
def test_every_dimension_grows_exactly(float64, make):
    """d_model (the residual stream), heads (q/k/v by whole heads), MLP and depth (stacked blocks), with AdamW."""
    net, opt, x, stream = trained(make)
    ref = net(x)
    autogrow.widen(net, stream, 16, split=0.5, generator=1, optimizer=opt, example_inputs=x)  # d_model x2
    autogrow.widen(net, "blocks.0.attn.q", 8, split=0.5, generator=2, optimizer=opt, example_inputs=x)  # 2 heads
    autogrow.widen(net, "blocks.0.fc1", 32, split=0.5, generator=3, optimizer=opt, example_inputs=x)  # MLP x2
    autogrow.stack(net, "blocks.0", generator=4, optimizer=opt, example_inputs=x)  # depth x2
    assert max_rel_error(ref, net(x)) <= 1e-9
    assert suite_transformers.shape_of(net) == {"d": 16, "heads": 2, "hidden": 32, "layers": 2}
    assert all(b.attn.k.out_features == b.attn.v.out_features == 8 for b in net.blocks)
    assert sorted(id(p) for g in opt.param_groups for p in g["params"]) == sorted(id(p) for p in net.parameters())


@pytest.mark.parametrize("make", [gpt_and_input, vit_and_input], ids=["gpt", "vit"])
def test_the_callback_finds_every_dimension(float64, make):
    net, x, stream = make()
    assert discover_targets(net, Widen(), None, x) == [stream, "blocks.0.attn.q", "blocks.0.fc1"]
    assert discover_targets(net, Stack(), None, x) == ["blocks.0"]


def test_flops_count_attention():
    attn, x = SelfAttention(d=8, heads=2, head_size=4), torch.zeros(1, 5, 8)
    linear = 4 * 2 * 5 * 8 * 8  # q, k, v, o
    assert forward_flops(attn, x) == linear + 2 * 2 * 2 * 5 * 5 * 4  # + q k^T and att v for 2 heads


def test_char_data_is_deterministic_and_split_by_file():
    a, b = (CharDataModule(context=8, batch_size=4, steps_per_epoch=2, val_windows=6, max_bytes=80_000, seed=3)
            for _ in range(2))
    assert torch.equal(next(iter(a.train_dataloader()))[0], next(iter(b.train_dataloader()))[0])
    loader = a.train_dataloader()
    first = next(iter(loader))[0]
    loader.sampler.set_epoch(1)
    assert not torch.equal(first, next(iter(loader))[0])  # new windows each epoch
    val = next(iter(a.val_dataloader()))
    assert val[0].shape == (6, 8) and torch.equal(val[0], next(iter(b.val_dataloader()))[0])
    assert a.vocab_size == len(a.chars) + 1 and int(a.train_data.max()) < len(a.chars)  # unknown id: val only


@pytest.mark.parametrize("task", ["lm", "vit"])
def test_quick_suite_grows_to_full_size_and_writes_results(tmp_path, tiny_idx, task):
    st = suite_transformers
    configs = [*st.DEFAULT_CONFIGS, st.BUDGET_2X, *(c for c in st.FIXED if c not in st.DEFAULT_CONFIGS),
               st.FRONTIER[0]]
    rows = st.main(["--quick", "--task", task, "--data-dir", tiny_idx, "--out", str(tmp_path), "--configs",
                    *configs])[task]
    out = tmp_path / "transformers"
    for suffix in (".md", ".csv", ".json", ".png", "_events.csv", "_curves.json"):
        assert (out / f"transformers_{task}{suffix}").exists()
    by_config = {r["config"]: r for r in rows}
    full = st.QUICK[task].dims(small=False)
    for config in ("grown", "grown 2x steps"):
        grown = by_config[config]
        assert {k: grown[k] for k in ("d", "heads", "hidden", "layers")} == \
            {k: full[k] for k in ("d", "heads", "hidden", "layers")}
        assert grown["params"] == by_config["scratch"]["params"] and grown["events"] == 4
        assert grown["flops_ratio"] < 1.0 if config == "grown" else True
    assert all(r["optimizer_ok"] for r in rows) and len(rows) == len(configs) == 12
    curves = json.loads((out / f"transformers_{task}_curves.json").read_text())
    md = (out / f"transformers_{task}.md").read_text()
    for config, (ref, share) in st.REFERENCE.items():  # every baseline on its budget, to half a step's worth
        row, dims = by_config[config], st.QUICK[task].dims(frac=st.FIXED.get(config, 1.0))
        assert {k: row[k] for k in ("d", "heads", "hidden", "layers")} == \
            {k: dims[k] for k in ("d", "heads", "hidden", "layers")} and row["events"] == 0
        steps = next(len(r["train_losses"]) for r in curves if r["config"] == config)
        assert abs(row["train_flops"] - share * by_config[ref]["train_flops"]) <= row["train_flops"] / steps / 2
        assert (f"**{ref!r} against {config}**" in md) == (config not in st.FRONTIER)
        assert (f"- {config}: final validation loss" in md) == (config in st.FRONTIER)
    events = json.loads((out / f"transformers_{task}_events.json").read_text())
    assert len(events) == 8 and all(0 <= e["preservation_error"] < 1e-5 for e in events)
    assert {e["callback"] for e in events} == {"widen", "stack"}
    for run in curves:  # training went on after the last growth, and the losses stayed finite
        last = max((e["step"] for e in run["events"]), default=0)
        assert run["evals"][-1]["step"] > last and all(loss == loss for loss in run["train_losses"])
    assert "Target" in md


def test_reuse_adds_a_configuration_without_rerunning(tmp_path, tiny_idx, monkeypatch):
    argv = ["--quick", "--task", "lm", "--out", str(tmp_path)]
    suite_transformers.main(argv + ["--configs", "grown", "scratch"])
    ran = []
    original = suite_transformers.run_config
    monkeypatch.setattr(suite_transformers, "run_config", lambda *a: ran.append(a[2]) or original(*a))
    rows = suite_transformers.main(argv + ["--reuse", "--configs", "grown", "scratch", "grown, deadline 0.3"])["lm"]
    assert ran == ["grown, deadline 0.3"] and [r["config"] for r in rows] == ["grown", "scratch", "grown, deadline 0.3"]
    assert rows[2]["d"] == suite_transformers.QUICK["lm"].d and rows[2]["events"] == 4


def test_regrow_reruns_growth_and_reuse_a_stale_budget_baseline(tmp_path, tiny_idx, monkeypatch):
    """``--regrow`` runs the grown configurations again and keeps scratch's; ``--reuse`` re-runs a budget baseline
    whose grown run now costs another number of steps (here: its saved FLOPs x1.5), and nothing else."""
    budget = suite_transformers.BUDGET
    argv = ["--quick", "--task", "lm", "--out", str(tmp_path), "--configs", "grown", "scratch", budget]
    suite_transformers.main(argv)
    ran = []
    original = suite_transformers.run_config
    monkeypatch.setattr(suite_transformers, "run_config", lambda *a: ran.append(a[2]) or original(*a))
    suite_transformers.main(argv + ["--regrow"])
    assert ran == ["grown"]
    path = tmp_path / "transformers" / "transformers_lm_curves.json"
    runs = json.loads(path.read_text())
    before = next(r["flops"] for r in runs if r["config"] == budget)
    for r in runs:
        if r["config"] == "grown":
            r["flops"] *= 1.5
    path.write_text(json.dumps(runs))
    ran.clear()
    suite_transformers.main(argv + ["--reuse"])
    assert ran == [budget]
    after = next(r["flops"] for r in json.loads(path.read_text()) if r["config"] == budget)
    assert after == pytest.approx(1.5 * before, rel=0.1)
