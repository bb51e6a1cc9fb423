"""Shared pieces of the experiment suites: one fit with a recorded history, results files, plots."""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from autogrow.callbacks import AutoGrow
from autogrow.experiments.data import ArrayDataModule, FashionMNISTDataModule
from autogrow.experiments.models import Classifier
from pytorch_lightning.callbacks import Callback

from autogrow import num_params


class History(Callback):
    """Records every validation (non-sanity) and every training loss, with wall time and FLOPs."""

    def __init__(self) -> None:
        self.evals: list[dict[str, float]] = []
        self.train_losses: list[float] = []
        self._t0 = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.train_losses.append(float(outputs["loss"]))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        m = trainer.callback_metrics
        epoch = trainer.global_step / max(1, trainer.num_training_batches)  # fractional with max_steps
        epoch = int(epoch) if epoch.is_integer() else round(epoch, 3)  # 'e3', not 'e3.0', in tables
        self.evals.append({"epoch": epoch, "step": trainer.global_step,
                           "time": time.perf_counter() - self._t0, "val_loss": float(m["val_loss"]),
                           "val_acc": float(m["val_acc"]), "train_flops": float(pl_module.train_flops),
                           "params": num_params(pl_module)})


@dataclass
class Run:
    """The outcome of one training run."""

    label: str
    evals: list[dict[str, float]]
    test_acc: float
    wall: float
    flops: float
    params: int
    events: list[dict[str, Any]] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def first_reaching(self, acc: float) -> dict[str, float] | None:
        return next((e for e in self.evals if e["val_acc"] >= acc), None)

    @property
    def best_val_acc(self) -> float:
        return max(e["val_acc"] for e in self.evals)


def train(label: str, module: Classifier, dm: ArrayDataModule, epochs: int, callbacks: Sequence[Callback] = (),
          seed: int = 0, validate_first: bool = False, max_steps: int = -1) -> Run:
    """Fit ``module`` for ``epochs`` (or ``max_steps`` optimizer steps) on ``dm``, then test; returns the
    recorded :class:`Run`."""
    history = History()
    trainer = pl.Trainer(max_epochs=epochs if max_steps < 0 else None, max_steps=max_steps,
                         callbacks=[history, *callbacks], logger=False, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, deterministic=True)
    extra = {}
    if validate_first:  # the model before any training: epoch 0
        res = trainer.validate(module, datamodule=dm, verbose=False)[0]
        extra["epoch0"] = {"epoch": 0, "step": 0, "time": 0.0, "val_loss": res["val_loss"], "val_acc": res["val_acc"],
                           "train_flops": 0.0, "params": num_params(module)}
    pl.seed_everything(seed, verbose=False)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    wall = time.perf_counter() - t0
    if validate_first:
        history.evals.insert(0, extra["epoch0"])
    if not history.evals or history.evals[-1]["step"] != trainer.global_step:  # max_steps stopped mid-epoch
        res = trainer.validate(module, datamodule=dm, verbose=False)[0]
        history.evals.append({"epoch": round(trainer.global_step / max(1, trainer.num_training_batches), 3),
                              "step": trainer.global_step, "time": wall, "val_loss": res["val_loss"],
                              "val_acc": res["val_acc"], "train_flops": float(module.train_flops),
                              "params": num_params(module)})
    test = trainer.test(module, datamodule=dm, verbose=False)[0]
    events = [e for cb in callbacks if isinstance(cb, AutoGrow) for e in cb.events]
    return Run(label, history.evals, float(test["test_acc"]), wall, float(module.train_flops),
               num_params(module), events, history.train_losses, extra)


def fashion(args: argparse.Namespace, flatten: bool = True, seed: int = 0) -> FashionMNISTDataModule:
    """Fashion-MNIST per the suite's arguments (``--quick``: a small slice, for tests)."""
    if args.quick:
        return FashionMNISTDataModule(data_dir=args.data_dir, batch_size=32, val_size=0.2, seed=seed,
                                      flatten=flatten, train_subset=args.train_subset)
    return FashionMNISTDataModule(data_dir=args.data_dir, batch_size=128, seed=seed, flatten=flatten,
                                  train_subset=args.train_subset)


def parser(description: str, epochs: int, seeds: int, train_subset: int | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny settings for the test suite (seconds)")
    ap.add_argument("--data-dir", default=None, help="folder with the IDX .gz files (else the Debian location)")
    ap.add_argument("--out", default=None, help="results folder (default experiments/results/<suite>)")
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--seeds", type=int, default=seeds)
    ap.add_argument("--train-subset", type=int, default=train_subset, help="training examples used (None: all)")
    return ap


def finish_args(args: argparse.Namespace, suite: str) -> Path:
    if args.quick:
        args.epochs, args.seeds = min(args.epochs, 3), 1
        args.train_subset = 160
    out = Path(args.out or Path(__file__).parent / "results" / suite)
    out.mkdir(parents=True, exist_ok=True)
    return out


def machine() -> str:
    return (f"{datetime.date.today().isoformat()}, {platform.machine()} {os.cpu_count()} CPU cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def mean_std(xs: Sequence[float], spec: str = ".4f") -> str:
    """``mean ± stdev`` over seeds (a single value alone), each formatted with ``spec``.

        >>> mean_std([0.5, 0.7]), mean_std([89.123], ".2f")
        ('0.6000 ± 0.1414', '89.12')
    """
    xs = list(xs)
    if len(xs) == 1:
        return format(xs[0], spec)
    return f"{statistics.mean(xs):{spec}} ± {statistics.stdev(xs):{spec}}"


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A markdown table: one row per dict, columns as (header, key, format spec).

        >>> print(table([{"a": 1, "b": 0.5}], [("A", "a", "d"), ("B", "b", ".2f")]))
        | A | B |
        |---|---|
        | 1 | 0.50 |
    """
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(format(r[k], f) for _, k, f in columns) + " |" for r in rows]
    return "\n".join(lines)


def write(out: Path, name: str, rows: list[dict[str, Any]], markdown: str) -> None:
    """``name``.csv and .json (rows), and .md (the table, with date and machine)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1, default=float))
    (out / f"{name}.md").write_text(f"{markdown}\n\n_Measured {machine()}._\n")
    print(markdown)


def plot(out: Path, name: str, runs: Sequence[Run], title: str) -> None:
    """Validation loss/accuracy against epochs, training FLOPs and wall time, and the parameter count;
    growth events marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_x = (("epoch", "epoch"), ("train_flops", "training FLOPs"), ("time", "wall time (s)"))
    fig, axes = plt.subplots(2, 4, figsize=(19, 8))
    for run in runs:
        for row, key in enumerate(("val_loss", "val_acc")):
            for col, (x, xlabel) in enumerate(axes_x):
                ax = axes[row][col]
                xs, ys = [e[x] for e in run.evals], [e[key] for e in run.evals]
                (line,) = ax.plot(xs, ys, marker=".", label=run.label)
                grown = [e for i, e in enumerate(run.evals[1:], 1) if e["params"] != run.evals[i - 1]["params"]]
                ax.plot([e[x] for e in grown], [e[key] for e in grown], "o", mfc="none", ms=10,
                        color=line.get_color())
                ax.set_xlabel(xlabel)
                ax.set_ylabel(key)
        ax = axes[0][3]
        ax.step([e["epoch"] for e in run.evals], [e["params"] for e in run.evals], where="post", label=run.label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("parameters")
    axes[1][3].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{title} (circles: evaluation after a growth)")
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=80)
    plt.close(fig)
