"""The transformer acceptance benchmark: grow a char-level GPT and a ViT from 1/4 size, against scratch.

Per seed (the seed sets the initialisation, the batches and, for Fashion-MNIST, the validation split;
grown and scratch runs of one seed see the same data):

* ``grown``: the 1/4-width, 1/4-depth model (d_model/4, heads/4, MLP/4, layers/4) with two AutoGrow
  callbacks: one widens (d_model, heads, MLP: every target discovered by tracing) x2 per event, one stacks
  blocks (depth x2 per event), ``max_events=2`` each, defaults otherwise (plateau trigger with a deadline at
  60% of the run, d_model by fresh units that the LayerNorms ramp in over 5% of the run, heads and MLP by fresh
  units, carried optimizer state, LR held while growing, re-warmed over 5% of the run after each growth, then
  decayed to 0 over the last 40%); it ends at the full size;
* ``scratch``: the full model for the same number of steps, the same warmup-free hold-then-decay schedule
  (a ``LambdaLR``);
* ``grown 2x steps``: the grown recipe for twice the steps (and the grown run's LR): what growing costs
  when it is given about scratch's FLOPs;
* ``grown, deadline 0.3`` (opt-in, ``--configs``): full size by 30% of the run instead of 60%, so that the full
  model also trains at the peak LR before the decay;
* ``grown, deadline 0.1`` (opt-in): full size by 10% of the run: whether a short small phase leaves a deficit (as it
  does on the Fashion-MNIST MLP, ``screen``'s probes);
* ``grown, stack duplicates`` (opt-in): the new blocks are unmodified copies (``Stack(init="duplicate")``, G_stack,
  Du et al. 2024) instead of copies whose stream writes start at zero: not function-preserving;
* ``1/2 size at grown's FLOPs``, ``3/4 size at grown's FLOPs``: the iso-FLOP baselines, a fixed model of that
  fraction of every dimension from scratch (its own schedule), for as many steps as cost the seed's grown run's
  FLOPs; each picks its LR from scratch's and the grown run's on the tuning seeds;
* ``scratch at grown 2x's FLOPs``, ``1/2 size at grown 2x's FLOPs``, ``3/4 size at grown 2x's FLOPs`` (opt-in): the
  same three baselines on the FLOPs of ``grown 2x steps``;
* ``scratch at 0.7x scratch's FLOPs``, ``1/2 size ...``, ``3/4 size ...`` (opt-in): the frontier at the target's
  budget, the same three trained on exactly 0.7x the FLOPs of the seed's scratch run: whether a fixed size meets
  the target without growing, and how far the best of them ends from scratch's final loss.

Each of ``grown`` and ``scratch`` picks its peak LR from ``--lrs`` by final validation loss over
``--tune-seeds`` separate seeds (one ``--lrs`` value: fixed, no tuning runs). FLOPs are the training FLOPs
actually spent (3x the forward pass, counted at the size the model had at every step, attention included). The
target: the grown run reaches scratch's final validation loss at <= 0.7x scratch's training FLOPs.

    python -m autogrow.experiments.suite_transformers --task lm      # GPT on Python's standard library
    python -m autogrow.experiments.suite_transformers --task vit     # ViT on Fashion-MNIST

The committed results: experiments/results/transformers/: ``--lrs 2e-3`` (one LR for every run, fixed in advance)
with every configuration (``'grown, stack duplicates'`` on the GPT only), per task; experiments/results/
transformers_tuned/: ``--lrs 2e-3 4e-3 8e-3 --folder transformers_tuned --configs grown scratch "scratch at grown's
FLOPs" "grown, deadline 0.3" "grown, deadline 0.1" "grown 2x steps"`` (grown and scratch each tuned on seed 1000; the
other configurations take the grown run's LR, the budget baseline scratch's), then ``--reuse --seeds 5 --configs
"1/2 size at grown's FLOPs" "3/4 size at grown's FLOPs"``, and the same with the three baselines at ``grown 2x steps``'s
FLOPs and with the three at the target's budget. The runs are saved after each one and
``--reuse`` adds missing (config, seed) pairs to them, and re-runs a budget baseline whose grown run now costs another
number of steps; ``--regrow`` re-tunes and re-runs every grown configuration, keeping scratch's runs and tuning.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn as nn
from autogrow.callbacks import AutoGrow
from autogrow.experiments.common import write
from autogrow.experiments.data import FashionMNISTDataModule
from autogrow.experiments.transformers import GPT, CharDataModule, LMModule, ViT, ViTClassifier
from pytorch_lightning.callbacks import Callback

from autogrow import num_params
from autogrow.actions import Stack, Widen
from autogrow.lr import applied_multiplier
from autogrow.optim import optimizer_holds_model

__all__ = ["TASKS", "Record", "Task", "main", "reach", "run_config", "step_ratio"]

TARGET = 0.7  # grown must reach scratch's final validation loss within this fraction of scratch's FLOPs
WINDOW = 20  # training steps before/after a growth compared by the optimizer-state check


@dataclass(frozen=True)
class Task:
    """One benchmark: the full model's dimensions (the grown one starts at 1/4 of each), the run's length."""

    name: str
    title: str
    d: int
    heads: int
    head_size: int
    hidden: int
    layers: int
    steps: int  # optimizer steps of one run
    val_every: int  # steps between validations
    batch_size: int
    context: int = 64  # lm only

    def dims(self, small: bool = False, frac: float = 1.0) -> dict[str, int]:
        """The model's dimensions: full, the 1/4 start (``small``: d_model, heads, MLP and depth), or ``frac`` of
        each (a fixed smaller model: the iso-FLOP baselines)."""
        k = 0.25 if small else frac
        return {"d": round(self.d * k), "heads": round(self.heads * k), "head_size": self.head_size,
                "hidden": round(self.hidden * k), "layers": round(self.layers * k)}


# Sized for one thread of a shared 2-core CPU (minutes per run): d_model 64 in 4 heads of 16, MLP 256, 4 blocks.
TASKS = {
    "lm": Task("lm", "char-level GPT on Python's standard library", 64, 4, 16, 256, 4, 1200, 40, 32),
    "vit": Task("vit", "ViT (7x7 patches) on Fashion-MNIST", 64, 4, 16, 256, 4, 1200, 40, 128),
}
QUICK = {"lm": Task("lm", "quick", 16, 4, 4, 32, 4, 12, 3, 4, context=16),
         "vit": Task("vit", "quick", 16, 4, 4, 32, 4, 12, 3, 32)}


class Record(Callback):
    """Every validation (step, wall time, FLOPs, size, metrics) and every training step (loss, effective LR)."""

    def __init__(self) -> None:
        self.evals: list[dict[str, float]] = []
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self._t0 = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))
        self.lrs.append(effective_lr(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        m = trainer.callback_metrics
        row = {"step": trainer.global_step, "time": time.perf_counter() - self._t0, "val_loss": float(m["val_loss"]),
               "train_flops": float(pl_module.train_flops), "params": num_params(pl_module)}
        if "val_acc" in m:
            row["val_acc"] = float(m["val_acc"])
        self.evals.append(row)


def effective_lr(trainer: pl.Trainer) -> float:
    """The LR of the next step: the group's LR times the growth multiplier the AutoGrow callbacks' hooks apply
    on the live optimizer (several callbacks: the larger multiplier, once)."""
    opt = trainer.optimizers[0]
    return float(opt.param_groups[0]["lr"]) * applied_multiplier(opt)


def data(task: Task, args: argparse.Namespace, seed: int) -> pl.LightningDataModule:
    if task.name == "lm":
        return CharDataModule(context=task.context, batch_size=task.batch_size, steps_per_epoch=task.val_every,
                              val_windows=16 if args.quick else 128, max_bytes=100_000 if args.quick else 3_000_000,
                              seed=seed)
    if args.quick:
        return FashionMNISTDataModule(data_dir=args.data_dir, batch_size=task.batch_size, val_size=0.2, seed=seed,
                                      flatten=False, train_subset=160)
    return FashionMNISTDataModule(data_dir=args.data_dir, batch_size=task.batch_size, val_size=2000, seed=seed,
                                  flatten=False)


def build(task: Task, dm: pl.LightningDataModule, small: bool, lr: float, scheduler: str | None,
          frac: float = 1.0) -> pl.LightningModule:
    """The LightningModule of ``task``: full size, the 1/4 start or ``frac`` of each dimension, with its optimizer
    settings."""
    if task.name == "lm":
        net: nn.Module = GPT(dm.vocab_size, task.context, **task.dims(small, frac))
        return LMModule(net, lr=lr, scheduler=scheduler)
    return ViTClassifier(ViT(**task.dims(small, frac)), optimizer="adam", lr=lr, scheduler=scheduler)


@dataclass
class Outcome:
    """One run: its record, test accuracy (ViT), wall time of the fit, FLOPs, the final size, growth events."""

    config: str
    seed: int
    lr: float
    record: Record
    test_acc: float
    wall: float
    flops: float
    params: int
    shape: dict[str, int]
    events: list[dict[str, Any]] = field(default_factory=list)
    optimizer_ok: bool = True

    @property
    def final_loss(self) -> float:
        return self.record.evals[-1]["val_loss"]


def shape_of(net: nn.Module) -> dict[str, int]:
    """d_model, heads, MLP width and depth of a GPT/ViT."""
    attn = net.blocks[0].attn
    return {"d": net.ln_f.normalized_shape[0], "heads": attn.q.out_features // attn.head_size,
            "hidden": net.blocks[0].fc1.out_features, "layers": len(net.blocks)}


BUDGET = "scratch at grown's FLOPs"  # the full model trained (its own schedule) on the grown run's FLOPs
BUDGET_2X = "scratch at grown 2x's FLOPs"  # the same on the FLOPs of the grown run with twice the steps
DUPLICATES = "grown, stack duplicates"  # G_stack: the new blocks unmodified copies (not function-preserving)
EARLY = "grown, deadline 0.1"  # full size by 10% of the run: what the small phase costs when it is short
AT_TARGET = f"at {TARGET}x scratch's FLOPs"
# the frontier at the target's budget: the full model and two fixed smaller ones, each trained (its own schedule) on
# exactly the FLOPs the target allows; whether any fixed size reaches scratch's final loss there
FRONTIER = (f"scratch {AT_TARGET}", f"1/2 size {AT_TARGET}", f"3/4 size {AT_TARGET}")
# the iso-FLOP baselines: a fixed smaller model (this fraction of every dimension) trained from scratch, its own
# schedule, for as many steps as cost a grown run's FLOPs (or, for the frontier, the target's)
FIXED = {"1/2 size at grown's FLOPs": 0.5, "3/4 size at grown's FLOPs": 0.75,
         "1/2 size at grown 2x's FLOPs": 0.5, "3/4 size at grown 2x's FLOPs": 0.75, FRONTIER[1]: 0.5, FRONTIER[2]: 0.75}
# a baseline's budget: this fraction of that run's FLOPs (of the same seed)
REFERENCE = {**{c: ("grown 2x steps" if "2x" in c else "grown", 1.0) for c in (BUDGET, BUDGET_2X, *list(FIXED)[:4])},
             **{c: ("scratch", TARGET) for c in FRONTIER}}
CONFIGS = ("grown", "scratch", "grown 2x steps", BUDGET, *list(FIXED)[:2], "grown, deadline 0.3", DUPLICATES, EARLY,
           BUDGET_2X, *list(FIXED)[2:4], *FRONTIER)
DEFAULT_CONFIGS = CONFIGS[:6]  # the rest: opt-in (--configs)


def grows(config: str) -> bool:
    """Whether ``config`` starts small and grows (else: the full model from scratch, its own LR)."""
    return config.startswith("grown")


def growers(config: str, seed: int) -> list[AutoGrow]:
    """The two callbacks of a grown run (as in tests/test_transformers.py), none for scratch."""
    if not grows(config):
        return []
    deadline = {"grown, deadline 0.3": 0.3, EARLY: 0.1}.get(config, 0.6)
    return [AutoGrow(grow=Widen(), max_events=2, seed=seed, deadline=deadline),
            AutoGrow(grow=Stack(init="duplicate" if config == DUPLICATES else "copy"), max_events=2, seed=seed,
                     deadline=deadline)]


def event_row(cb: AutoGrow, event: Any) -> dict[str, Any]:
    return {"callback": cb.action.name, "index": event.index, "step": event.step, "reason": event.reason.value,
            "changes": "; ".join(f"{c.target} {c.old}->{c.new}" if c.old or c.new else c.target for c in event.changes),
            "params_before": event.params_before, "params_after": event.params_after,
            "preservation_error": event.preservation_error}


def run_config(task: Task, args: argparse.Namespace, config: str, seed: int, lr: float,
               steps: int | None = None) -> Outcome:
    """One run of ``config`` (one of ``CONFIGS``) at peak LR ``lr``; ``steps``: its length (default: the task's,
    twice that for ``grown 2x steps``)."""
    grown = grows(config)
    steps = steps or task.steps * (2 if config == "grown 2x steps" else 1)
    pl.seed_everything(seed, verbose=False)
    dm = data(task, args, seed)
    dm.setup()
    module = build(task, dm, small=grown, lr=lr, scheduler=None if grown else "wsd", frac=FIXED.get(config, 1.0))
    callbacks, record = growers(config, seed), Record()
    trainer = pl.Trainer(max_steps=steps, max_epochs=-1, val_check_interval=task.val_every,
                         check_val_every_n_epoch=None, callbacks=[record, *callbacks], logger=False,
                         accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, deterministic=True)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    wall = time.perf_counter() - t0
    test_acc = float(trainer.test(module, datamodule=dm, verbose=False)[0]["test_acc"]) if task.name == "vit" \
        else float("nan")
    events = sorted((event_row(cb, e) for cb in callbacks for e in cb.events), key=lambda r: r["step"])
    out = Outcome(config, seed, lr, record, test_acc, wall, module.train_flops, num_params(module),
                  shape_of(module.model), events, optimizer_holds_model(trainer.optimizers[0], module))
    print(f"[{task.name}] {config} seed {seed} lr {lr:g}: val loss {out.final_loss:.4f}, FLOPs {out.flops:.3g}, "
          f"{wall:.0f} s, shape {out.shape}", flush=True)
    return out


def tune(task: Task, args: argparse.Namespace, config: str, log: list[dict[str, Any]]) -> float:
    """The peak LR of ``--lrs`` with the lowest mean final validation loss over the tuning seeds."""
    if len(args.lrs) == 1:
        return args.lrs[0]
    scores = {}
    for lr in args.lrs:
        losses = [run_config(task, args, config, 1000 + s, lr).final_loss for s in range(args.tune_seeds)]
        scores[lr] = statistics.mean(losses)
        log.append({"config": config, "lr": lr, "val_loss": scores[lr], "seeds": args.tune_seeds})
    return min(scores, key=scores.__getitem__)


def reach(evals: list[dict[str, float]], loss: float) -> dict[str, float] | None:
    """The first evaluation at or below validation loss ``loss`` (``None``: never).

        >>> reach([{"val_loss": 2.0}, {"val_loss": 1.0}, {"val_loss": 0.5}], 1.0)
        {'val_loss': 1.0}
    """
    return next((e for e in evals if e["val_loss"] <= loss), None)


def step_ratio(losses: list[float], step: int, window: int = WINDOW) -> float:
    """Mean training loss over the ``window`` steps after ``step`` over the ``window`` before (``losses[i]``:
    the loss of optimizer step ``i + 1``); near 1 when a growth at ``step`` causes no spike.

        >>> step_ratio([2.0, 2.0, 1.0, 1.0], 2, window=2)
        0.5
    """
    if step < window or step + window > len(losses):
        return float("nan")
    return statistics.mean(losses[step: step + window]) / statistics.mean(losses[step - window: step])


def nan_if_none(hit: dict[str, float] | None, key: str, total: float) -> float:
    return hit[key] / total if hit is not None else float("nan")


def summary_row(o: Outcome, scratch: Outcome | None) -> dict[str, Any]:
    """One run's numbers, paired with the scratch run of its seed: where it first reaches scratch's final
    validation loss (fractions of scratch's FLOPs and wall time), and where scratch reached its final loss."""
    hit = reach(o.record.evals, scratch.final_loss) if scratch else None
    back = reach(scratch.record.evals, o.final_loss) if scratch else None
    s_flops, s_wall = (scratch.flops, scratch.wall) if scratch else (float("nan"), float("nan"))
    return {"config": o.config, "seed": o.seed, "lr": o.lr, "final_val_loss": o.final_loss,
            "best_val_loss": min(e["val_loss"] for e in o.record.evals), "test_acc": o.test_acc,
            "train_flops": o.flops, "flops_ratio": o.flops / s_flops, "wall_s": o.wall, "wall_ratio": o.wall / s_wall,
            "params": o.params, **o.shape, "events": len(o.events), "optimizer_ok": o.optimizer_ok,
            "reach_flops": nan_if_none(hit, "train_flops", s_flops), "reach_time": nan_if_none(hit, "time", s_wall),
            "reach_step": hit["step"] if hit else float("nan"),
            "scratch_flops_at_this_loss": nan_if_none(back, "train_flops", s_flops)}


def analyse(outcomes: list[Outcome]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows per run and per growth event (preservation error, the training-loss ratio around it, and
    scratch's ratio over the same steps: the trend without growth)."""
    scratch = {o.seed: o for o in outcomes if o.config == "scratch"}
    rows, events = [], []
    for o in outcomes:
        s = scratch.get(o.seed)
        rows.append(summary_row(o, s))
        for e in o.events:
            ratio = step_ratio(o.record.losses, e["step"])
            trend = step_ratio(s.record.losses, e["step"]) if s else float("nan")
            events.append({"config": o.config, "seed": o.seed, **e, "loss_ratio": ratio, "scratch_loss_ratio": trend})
    return rows, events


def _ms(xs: list[float], spec: str = ".4f", scale: float = 1.0) -> str:
    xs = [scale * x for x in xs if x == x]
    if not xs:
        return "-"
    return format(xs[0], spec) if len(xs) == 1 else f"{statistics.mean(xs):{spec}} ± {statistics.stdev(xs):{spec}}"


def _per_seed(xs: list[float]) -> str:
    return ", ".join("not reached" if x != x else f"{x:.2f}" for x in xs)


def runs_table(rows: list[dict[str, Any]], vit: bool) -> str:
    head = ("| run | final val loss | " + ("test acc % | " if vit else "") + "FLOPs / scratch | wall s | "
            "first reaches scratch's final val loss at FLOPs / scratch (per seed) | ... at wall / scratch | "
            "scratch reaches this final loss at FLOPs / scratch |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for c in dict.fromkeys(r["config"] for r in rows):
        col = {k: [r[k] for r in rows if r["config"] == c] for k in rows[0]}
        acc = f"{_ms(col['test_acc'], '.2f', 100)} | " if vit else ""
        lines.append(f"| {c} | {_ms(col['final_val_loss'])} | {acc}{_ms(col['flops_ratio'], '.3f')} | "
                     f"{_ms(col['wall_s'], '.0f')} | {_per_seed(col['reach_flops'])} | {_per_seed(col['reach_time'])} "
                     f"| {_per_seed(col['scratch_flops_at_this_loss'])} |")
    return "\n".join(lines)


def events_table(events: list[dict[str, Any]]) -> str:
    lines = ["| run | seed | step | action | changes | parameters | preservation error | train loss after / before "
             f"({WINDOW} steps) | scratch, same steps |", "|---|---|---|---|---|---|---|---|---|"]
    for e in events:
        err = "n/a" if e["preservation_error"] is None else f"{e['preservation_error']:.1e}"
        lines.append(f"| {e['config']} | {e['seed']} | {e['step']} | {e['callback']} ({e['reason']}) | "
                     f"{e['changes']} | {e['params_before']:,} -> {e['params_after']:,} | {err} | "
                     f"{e['loss_ratio']:.3f} | {e['scratch_loss_ratio']:.3f} |")
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]], config: str) -> str:
    """Whether ``config`` met the target in every seed, with the FLOPs and wall-time fractions (mean ± std over
    the seeds that reached scratch's final loss at all)."""
    xs = [r["reach_flops"] for r in rows if r["config"] == config]
    if not xs:
        return ""
    met = sum(x <= TARGET for x in xs if x == x)
    reached = [x for x in xs if x == x]
    worst = "never reached in " + str(len(xs) - len(reached)) + " seed(s)" if len(reached) < len(xs) else \
        f"worst {max(reached):.2f}x"
    times = [r["reach_time"] for r in rows if r["config"] == config]
    where = (f"reaches scratch's final validation loss at {_ms(xs, '.2f')}x its FLOPs and {_ms(times, '.2f')}x its "
             f"wall time (over the {len(reached)} seed(s) that reach it)" if reached else
             "never reaches scratch's final validation loss")
    spent = [r["flops_ratio"] for r in rows if r["config"] == config]
    back = [r["scratch_flops_at_this_loss"] for r in rows if r["config"] == config]
    pays = statistics.mean(spent) < statistics.mean(back) if all(b == b for b in back) else False
    return (f"- **{config}**: {where}; <= {TARGET}x FLOPs in {met}/{len(xs)} seeds ({worst}): "
            f"target {'met' if met == len(xs) else 'NOT met'}. It spends {_ms(spent, '.2f')}x scratch's FLOPs for "
            f"its final loss, which scratch's run passes at {_ms(back, '.2f')}x (mid-run, before its LR decay): "
            f"against scratch's curve at equal FLOPs growth {'pays' if pays else 'does not pay'} here.")


COLORS = {"grown": "tab:blue", "scratch": "tab:orange", "grown 2x steps": "tab:green",
          "grown, deadline 0.3": "tab:purple", BUDGET: "tab:red", EARLY: "tab:brown",
          "1/2 size at grown's FLOPs": "tab:olive", "3/4 size at grown's FLOPs": "tab:cyan",
          BUDGET_2X: "tab:pink", "1/2 size at grown 2x's FLOPs": "tab:gray", "3/4 size at grown 2x's FLOPs": "black",
          FRONTIER[0]: "gold", FRONTIER[1]: "lime", FRONTIER[2]: "navy"}
BASELINES = {c: ("the full model from scratch" if c not in FIXED else
                 f"a fixed model of {FIXED[c]:g}x every dimension from scratch") +
             f" for as many steps as cost the {REFERENCE[c][0]!r} run's FLOPs, its own hold-then-decay schedule and LR"
             for c in REFERENCE if c not in FRONTIER}  # the baselines a grown run is paired with


def frontier_verdict(rows: list[dict[str, Any]]) -> str:
    """The fixed sizes trained on exactly the target's FLOPs against scratch's full run, paired by seed: whether
    the target can be met without growing, and how far the best of them ends from it."""
    scratch = {r["seed"]: r for r in rows if r["config"] == "scratch"}
    lines = []
    for c in FRONTIER:
        mine = [r for r in rows if r["config"] == c and r["seed"] in scratch]
        if not mine:
            continue
        gap = [r["final_val_loss"] - scratch[r["seed"]]["final_val_loss"] for r in mine]
        hit = sum(r["reach_flops"] == r["reach_flops"] for r in mine)
        acc = f", test accuracy {_ms([r['test_acc'] for r in mine], '.2f', 100)} %" \
            if mine[0]["test_acc"] == mine[0]["test_acc"] else ""
        lines.append(f"- {c}: final validation loss {_ms([r['final_val_loss'] for r in mine])}{acc}, "
                     f"{_ms(gap)} against scratch's full run (positive: higher); reaches scratch's final validation "
                     f"loss in {hit}/{len(mine)} seeds")
    if not lines:
        return ""
    return (f"\n\n**The frontier at the target's budget** (fixed sizes from scratch, each on {TARGET}x scratch's FLOPs "
            "with its own hold-then-decay schedule and LR; paired by seed with scratch's full run): a growth run that "
            "meets the target ends at or below scratch's final loss on this budget, so it must do at least as well as "
            "the best of these.\n\n" + "\n".join(lines))


def baseline_verdict(rows: list[dict[str, Any]], config: str) -> str:
    """Baseline ``config`` (one of ``BASELINES``) against the grown run of the same FLOPs, paired by seed."""
    ref = REFERENCE[config][0]
    pairs = [(g, b) for g in rows if g["config"] == ref for b in rows
             if b["config"] == config and b["seed"] == g["seed"]]
    if not pairs:
        return ""
    wins = sum(g["final_val_loss"] < b["final_val_loss"] for g, b in pairs)
    diff = [g["final_val_loss"] - b["final_val_loss"] for g, b in pairs]
    text = (f"\n\n**{ref!r} against {config}** ({BASELINES[config]}; paired by seed): grown final validation loss "
            f"{_ms([g['final_val_loss'] for g, _ in pairs])} vs {_ms([b['final_val_loss'] for _, b in pairs])}, "
            f"difference {_ms(diff)}; grown lower in {wins}/{len(pairs)} seeds")
    acc = [(g["test_acc"], b["test_acc"]) for g, b in pairs if g["test_acc"] == g["test_acc"]]
    if acc:  # the ViT: its validation loss and its accuracy can disagree (a model trained long gets overconfident)
        text += (f"; test accuracy {_ms([a for a, _ in acc], '.2f', 100)} vs {_ms([b for _, b in acc], '.2f', 100)} %, "
                 f"difference {_ms([a - b for a, b in acc], '.2f', 100)} pp, grown higher in "
                 f"{sum(a > b for a, b in acc)}/{len(acc)} seeds")
        wins = min(wins, sum(a > b for a, b in acc))
    return text + f": growth {'pays' if wins == len(pairs) else 'does not pay'} against this baseline."


def _curves(ax: Any, outcomes: list[Outcome], x: str, y: str, xlabel: str) -> None:
    for o in outcomes:
        evals = o.record.evals
        ax.plot([e[x] for e in evals], [e[y] for e in evals], color=COLORS.get(o.config), alpha=1.0 if o.seed == 0
                else 0.35, lw=1.2, label=o.config if o.seed == 0 else None)
        steps = {e["step"] for e in o.events}
        marks = [e for e in evals if e["step"] in steps]
        ax.plot([e[x] for e in marks], [e[y] for e in marks], "o", mfc="none", ms=8, color=COLORS.get(o.config),
                alpha=1.0 if o.seed == 0 else 0.35)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(y)


def _loss_range(outcomes: list[Outcome]) -> tuple[float, float]:
    """Validation-loss limits that show every final loss and every growth event, not the first steep drop."""
    lows = [e["val_loss"] for o in outcomes for e in o.record.evals]
    steps = [{e["step"] for e in o.events} for o in outcomes]
    shown = [o.final_loss for o in outcomes] + [e["val_loss"] for o, s in zip(outcomes, steps)
                                                for e in o.record.evals if e["step"] in s]
    margin = 0.08 * (max(shown) - min(lows)) + 0.01
    return min(lows) - margin, max(shown) + margin


def plot(out: Path, name: str, outcomes: list[Outcome], title: str) -> None:
    """Validation loss against training FLOPs, wall time and steps (all seeds; seed 0 solid), parameters,
    the effective LR and the training loss of seed 0; circles: the evaluation just before a growth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    scratch = next((o for o in outcomes if o.config == "scratch" and o.seed == 0), None)
    for ax, (x, label) in zip(axes[0], (("train_flops", "training FLOPs"), ("time", "wall time (s)"),
                                        ("step", "optimizer step"))):
        _curves(ax, outcomes, x, "val_loss", label)
        ax.set_ylim(*_loss_range(outcomes))
        if scratch is not None:
            ax.axhline(scratch.final_loss, color="gray", ls=":", lw=1)
    if scratch is not None:
        axes[0][0].axvline(TARGET * scratch.flops, color="red", ls="--", lw=1, label=f"{TARGET}x scratch FLOPs")
    axes[0][0].legend(fontsize=8)
    _curves(axes[1][0], [o for o in outcomes if o.seed == 0], "train_flops", "params", "training FLOPs")
    for o in (o for o in outcomes if o.seed == 0):
        axes[1][1].plot(o.record.lrs, color=COLORS.get(o.config), label=o.config)
        k = 10
        smooth = [statistics.mean(o.record.losses[max(0, i - k): i + 1]) for i in range(len(o.record.losses))]
        axes[1][2].plot(smooth, color=COLORS.get(o.config), label=o.config, lw=1)
        for e in o.events:
            axes[1][2].axvline(e["step"], color=COLORS.get(o.config), ls=":", lw=0.8)
    axes[1][1].set(xlabel="optimizer step", ylabel="effective LR (seed 0)")
    axes[1][2].set(xlabel="optimizer step", ylabel="training loss, running mean of 10 (seed 0)")
    axes[1][2].set_ylim(top=min(o.record.losses[0] for o in outcomes))
    fig.suptitle(f"{title}: grown (1/4 -> full) vs scratch; circles: growth events; dotted: scratch's final loss")
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=80)
    plt.close(fig)


def lr_text(args: argparse.Namespace, lrs: dict[str, float], tuning: list[dict[str, Any]]) -> str:
    """How the peak LRs were set: fixed (one ``--lrs``), or the tuning table."""
    head = ("Peak LR (AdamW/Adam, held (grown runs: re-warmed from 0.1x over 5% of the run after each growth, the "
            "library's default), then linearly to 0 over the last 40% of the steps)")
    if not tuning:
        return f"{head}: {lrs['grown']:g} for every run, fixed in advance, not tuned."
    lines = "\n".join(f"| {t['config']} | {t['lr']:g} | {t['val_loss']:.4f} |" for t in tuning)
    chosen = ", ".join(f"{c} {lrs[c]:g} (of {sorted(t['lr'] for t in tuning if t['config'] == c)})"
                       for c in ("grown", "scratch", *FIXED) if c in lrs)
    return (f"{head}: {chosen}, each chosen by final validation loss on {args.tune_seeds} separate seed(s) (a fixed "
            f"smaller model from scratch's and the grown run's):\n\n| run | LR | val loss |\n|---|---|---|\n{lines}")


def report(out: Path, task: Task, args: argparse.Namespace, rows: list[dict[str, Any]], events: list[dict[str, Any]],
           tuning: list[dict[str, Any]], lrs: dict[str, float], described: str) -> str:
    """The markdown report (also written with the rows as csv/json)."""
    full, small = task.dims(False), task.dims(True)
    errors = [e["preservation_error"] for e in events  # the duplicates change the function on purpose
              if e["preservation_error"] is not None and e["config"] != DUPLICATES]
    md = (f"### Transformers grow: {task.title}, {args.seeds} seeds\n\n"
          f"Full model {full}; grown from {small} with two AutoGrow callbacks (widen x2 and stack x2, "
          f"`max_events=2` each, defaults otherwise: d_model by fresh units that the LayerNorms ramp in over 5% of the "
          f"run). {task.steps} optimizer steps of batch {task.batch_size}"
          + (f" x {task.context} characters" if task.name == "lm" else "") + f", validation every {task.val_every} "
          f"steps. {described}\n\n{lr_text(args, lrs, tuning)}\n\n{runs_table(rows, task.name == 'vit')}\n\n"
          f"**Target** (reach scratch's final validation loss at <= "
          f"{TARGET}x scratch's training FLOPs, paired by seed):\n\n"
          + "\n".join(v for v in (verdict(rows, c) for c in CONFIGS if grows(c)) if v)
          + "".join(baseline_verdict(rows, c) for c in BASELINES) + frontier_verdict(rows)
          + f"\n\n**Growth events**: largest preservation error {max(errors, default=float('nan')):.1e} (relative, "
          f"float32, on a validation batch in eval mode; '{DUPLICATES}' not counted: its stacks change the function "
          f"by design). Optimizer-state check (after training, the optimizer "
          f"holds exactly the model's parameters, every moment of its parameter's shape): "
          f"{sum(r['optimizer_ok'] for r in rows)}/{len(rows)} runs pass.\n\n{events_table(events)}\n\n"
          f"FLOPs: training FLOPs (3x the forward pass, attention counted dense), at the size the model had at "
          f"every step. Wall times on a shared machine ({args.threads} thread), validation included.")
    write(out, f"transformers_{task.name}", rows, md)
    write(out, f"transformers_{task.name}_events", events, events_table(events))
    return md


def describe(task: Task, args: argparse.Namespace) -> str:
    if task.name == "vit":
        return "Fashion-MNIST: 2,000 validation images split from the training set by seed, the 10,000 test images."
    d = data(task, args, 0).describe()
    return (f"Data: {d['files']} `.py` files of {d['source']} (Python {sys.version.split()[0]}, sorted, "
            f"{d['first']} .. {d['last']}), every 10th file held out: {d['train_chars']:,} training and "
            f"{d['val_chars']:,} validation characters, vocabulary {d['vocab']}.")


def save_runs(out: Path, task: Task, outcomes: list[Outcome], tuning: list[dict[str, Any]],
              lrs: dict[str, float]) -> None:
    """Every run's curves and numbers, the tuning (``--reuse`` reads them back)."""
    runs = [{"config": o.config, "seed": o.seed, "lr": o.lr, "evals": o.record.evals, "train_losses": o.record.losses,
             "effective_lr": o.record.lrs, "events": o.events, "shape": o.shape, "wall": o.wall, "flops": o.flops,
             "params": o.params, "test_acc": o.test_acc, "optimizer_ok": o.optimizer_ok} for o in outcomes]
    (out / f"transformers_{task.name}_curves.json").write_text(json.dumps(runs, default=float))
    (out / f"transformers_{task.name}_tuning.json").write_text(json.dumps({"lrs": lrs, "tuning": tuning}))


def load_runs(out: Path, task: Task) -> tuple[list[Outcome], list[dict[str, Any]], dict[str, float]] | None:
    """The runs and tuning a previous invocation saved in ``out`` (``None``: nothing saved)."""
    curves, tuned = out / f"transformers_{task.name}_curves.json", out / f"transformers_{task.name}_tuning.json"
    if not curves.exists() or not tuned.exists():
        return None
    outcomes = []
    for r in json.loads(curves.read_text()):
        record = Record()
        record.evals, record.losses, record.lrs = r["evals"], r["train_losses"], r["effective_lr"]
        last = r["evals"][-1]
        outcomes.append(Outcome(r["config"], r["seed"], r["lr"], record, float(r.get("test_acc", "nan")), r["wall"],
                                r.get("flops", last["train_flops"]), r.get("params", last["params"]), r["shape"],
                                r["events"], r.get("optimizer_ok", True)))
    saved = json.loads(tuned.read_text())
    return outcomes, saved["tuning"], saved["lrs"]


def budget_flops(outcomes: list[Outcome], seed: int, config: str) -> float | None:
    """The training FLOPs baseline ``config`` may spend: ``REFERENCE[config]``'s share of that run of seed ``seed``
    (``None``: no such run).

        >>> o = lambda c, f: Outcome(c, 0, 1e-3, Record(), float("nan"), 1.0, f, 1, {})
        >>> budget_flops([o("grown", 4.5e11), o("scratch", 1.2e12)], 0, FRONTIER[0])
        840000000000.0
    """
    ref, share = REFERENCE[config]
    run = next((o for o in outcomes if o.config == ref and o.seed == seed), None)
    return None if run is None else share * run.flops


def budget_steps(task: Task, outcomes: list[Outcome], seed: int, config: str = BUDGET) -> int | None:
    """Steps of the full model that cost baseline ``config``'s budget (``None``: a run it needs is missing).

        >>> o = lambda c, f: Outcome(c, 0, 1e-3, Record(), float("nan"), 1.0, f, 1, {})
        >>> budget_steps(TASKS["lm"], [o("grown", 4.5e11), o("scratch", 1.2e12)], 0)
        450
    """
    flops = budget_flops(outcomes, seed, config)
    scratch = next((o for o in outcomes if o.config == "scratch" and o.seed == seed), None)
    if flops is None or scratch is None:
        return None
    return max(1, round(flops / (scratch.flops / task.steps)))


def fixed_steps(task: Task, args: argparse.Namespace, outcomes: list[Outcome], seed: int, config: str) -> int | None:
    """Steps of the fixed smaller model of ``config`` (one of ``FIXED``) that cost its budget (``None``: the run
    it is measured against is missing)."""
    flops = budget_flops(outcomes, seed, config)
    if flops is None:
        return None
    dm = data(task, args, seed)
    dm.setup()
    module = build(task, dm, small=False, lr=1e-3, scheduler=None, frac=FIXED[config])
    x = next(iter(dm.train_dataloader()))[0]
    return max(1, round(flops / (3 * module.count_flops(x) * len(x))))


def tune_fixed(task: Task, args: argparse.Namespace, config: str, lrs: dict[str, float], steps: int,
               log: list[dict[str, Any]]) -> float:
    """The peak LR of a fixed smaller model: scratch's or the grown run's (a smaller model may want the larger),
    by final validation loss over the tuning seeds, trained for ``steps``."""
    candidates = sorted({lrs["scratch"], lrs["grown"]})
    if len(candidates) == 1:
        return candidates[0]
    scores = {}
    for lr in candidates:
        scores[lr] = statistics.mean(run_config(task, args, config, 1000 + s, lr, steps).final_loss
                                     for s in range(args.tune_seeds))
        log.append({"config": config, "lr": lr, "val_loss": scores[lr], "seeds": args.tune_seeds})
    return min(scores, key=scores.__getitem__)


def _steps(task: Task, args: argparse.Namespace, outcomes: list[Outcome], seed: int, config: str) -> int | None:
    """A baseline's steps on its grown run's FLOPs; ``None`` for the other configurations (their own length)."""
    if config in FIXED:
        return fixed_steps(task, args, outcomes, seed, config)
    return budget_steps(task, outcomes, seed, config) if config in REFERENCE else None


def run_task(task: Task, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """Tune, run every seed of every configuration, write the results; returns the rows per run."""
    saved = load_runs(out, task) if args.reuse or args.regrow else None
    outcomes, tuning, lrs = saved or ([], [], {})
    if saved and args.regrow:  # the library's growth changed: keep the scratch runs, tune and run growth again
        outcomes = [o for o in outcomes if not grows(o.config)]
        tuning = [t for t in tuning if not grows(t["config"])]
        lrs["grown"] = tune(task, args, "grown", tuning)
    if not saved:
        lrs = {c: tune(task, args, c, tuning) for c in ("grown", "scratch")}
    done = {(o.config, o.seed) for o in outcomes}
    for seed in range(args.seeds):
        for c in args.configs:
            steps = _steps(task, args, outcomes, seed, c)
            stale = [o for o in outcomes if (o.config, o.seed) == (c, seed) and steps and len(o.record.losses) != steps]
            if (c, seed) in done and not stale:
                continue
            outcomes = [o for o in outcomes if not any(o is x for x in stale)]  # its grown run was re-run
            if c in REFERENCE and steps is None:
                print(f"[{task.name}] {c} seed {seed}: needs the grown (and scratch) runs of the seed", flush=True)
                continue
            if c in FIXED and c not in lrs:
                lrs[c] = tune_fixed(task, args, c, lrs, steps, tuning)
            lr = lrs[c] if c in FIXED else lrs["grown" if grows(c) else "scratch"]
            outcomes.append(run_config(task, args, c, seed, lr, steps))
            outcomes.sort(key=lambda o: (o.seed, CONFIGS.index(o.config)))
            save_runs(out, task, outcomes, tuning, lrs)  # after every run: an interrupted sweep resumes (--reuse)
    rows, events = analyse(outcomes)
    report(out, task, args, rows, events, tuning, lrs, describe(task, args))
    plot(out, f"transformers_{task.name}", outcomes, TASKS[task.name].title)
    return rows


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["lm", "vit", "both"], default="both")
    ap.add_argument("--quick", action="store_true", help="tiny settings for the test suite (seconds)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tune-seeds", type=int, default=1)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    ap.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=CONFIGS)
    ap.add_argument("--reuse", action="store_true", help="keep the runs and tuning saved in the results folder; "
                    "run only the missing (config, seed) pairs")
    ap.add_argument("--regrow", action="store_true", help="keep the saved scratch runs and their tuning; tune "
                    "the grown runs' LR over --lrs and run every grown configuration again (after a change to growth)")
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder (else the Debian location)")
    ap.add_argument("--out", default=None, help="parent of the results folder `transformers` (default "
                    "experiments/results)")
    ap.add_argument("--folder", default="transformers", help="the results folder's name (transformers_tuned: the "
                    "run with tuned LRs)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.tune_seeds, args.lrs = min(args.seeds, 1), 1, args.lrs[:1]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    results = {}
    try:
        for name in (["lm", "vit"] if args.task == "both" else [args.task]):
            task = (QUICK if args.quick else TASKS)[name]
            out = Path(args.out or Path(__file__).parent / "results") / args.folder
            out.mkdir(parents=True, exist_ok=True)
            results[name] = run_task(task, args, out)
    finally:
        torch.set_num_threads(threads)
    return results


if __name__ == "__main__":
    main()
