"""Grid search over widths vs one AutoGrow run (Fashion-MNIST, two-hidden-layer MLP), per seed.

* grid: every (h1, h2) in {64, 128, 256}^2 trained from scratch for ``--epochs`` (Adam, hold-then-decay LR);
* growth: one run from (32, 32) with ``AutoGrow(max_params=<the grid's largest net>)`` defaults: it does not
  know the best size, only the largest it may reach;
* growth by 5%: the same, all its growth done by 5% of the run (``deadline=Deadline(0.05, ratio=1.0)``): the small
  phase kept short (a run that spends 10% of itself small ends 0.6 pp lower here, one that spends 5% does not);
* resize: growth by 5%, then ``shrink=Shrink()`` (defaults) prunes the units the net does not need: a self-resizing
  run that ends at the size it found;
* net2net: a (64, 64) net trained half the epochs, widened by Net2WiderNet into each grid size and trained the
  other half *with its optimizer state carried* (translated by parameter name), so the (64, 64) row is the
  same net trained straight through (only the LR schedule restarts its decay in the second half).

Reported: each configuration's test accuracy (mean ± std over seeds), wall time and training FLOPs; the grid's
best (by validation accuracy) and the grid's total cost; the growth run against both.

Run: ``python -m autogrow.experiments.suite_grid [--epochs 8] [--seeds 3]``
"""

from __future__ import annotations

import copy
import itertools
import statistics
from typing import Any

import pytorch_lightning as pl
from autogrow.callbacks import AutoGrow
from autogrow.experiments.common import Run, fashion, finish_args, parser, plot, train, write
from autogrow.experiments.models import MLP, Classifier
from pytorch_lightning.callbacks import Callback

import autogrow
from autogrow.plateau import Deadline
from autogrow.resize import Shrink

GRID = (64, 128, 256)
LR = 1e-3
EARLY = Deadline(0.05, ratio=1.0)  # every growth event at 5% of the run
GROWTH = {"growth": {}, "growth by 5%": {"deadline": EARLY}, "resize": {"deadline": EARLY, "shrink": Shrink()}}


class KeepOptimizer(Callback):
    """Keeps the optimizer's state and its parameters' names at the end of a fit."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        opt = trainer.optimizers[0]
        self.state, self.names = copy.deepcopy(opt.state_dict()), autogrow.param_names(opt, pl_module)


class CarryOptimizer(Callback):
    """Loads a kept optimizer state, translated through ``growths``, into the next fit's optimizer."""

    def __init__(self, kept: KeepOptimizer, growths: list[autogrow.Growth]) -> None:
        self.kept, self.growths = kept, growths

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        opt = trainer.optimizers[0]
        lrs = [g["lr"] for g in opt.param_groups]  # the new phase's schedule owns the LR
        # a copy: torch's load_state_dict keeps the saved step tensors, and every row starts from the same state
        autogrow.translate_state_dict(copy.deepcopy(self.kept.state), self.kept.names, self.growths, opt, pl_module)
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr


def net2net_rows(args: Any, dm: Any, grid: tuple[int, ...], seed: int) -> list[tuple[str, Run, tuple[int, int]]]:
    """The small net trained half the run, then widened into each grid size and trained on, state carried."""
    half = max(1, args.epochs // 2)
    pl.seed_everything(seed, verbose=False)
    base, kept = Classifier(MLP(784, [grid[0], grid[0]]), optimizer="adam", lr=LR), KeepOptimizer()
    base_run = train(f"base {grid[0]}x{grid[0]}", base, dm, half, [kept], seed=seed)
    out = []
    for h1, h2 in itertools.product(grid, grid):
        module = Classifier(copy.deepcopy(base.model), optimizer="adam", lr=LR, scheduler="wsd")
        growths = [autogrow.widen(module, f"model.{name}", h, split=0.5, generator=seed * 1000 + h)
                   for name, h in (("fc1", h1), ("fc2", h2)) if h > grid[0]]
        module.train_flops = base.train_flops
        run = train(f"net2net {h1}x{h2}", module, dm, args.epochs - half, [CarryOptimizer(kept, growths)], seed=seed)
        run.wall += base_run.wall
        out.append(("net2net", run, (h1, h2)))
    return out


def one_seed(args: Any, dm: Any, grid: tuple[int, ...], seed: int) -> tuple[list[dict[str, Any]], list[Run]]:
    runs: list[tuple[str, Run, tuple[int, int]]] = []
    for h1, h2 in itertools.product(grid, grid):
        pl.seed_everything(seed, verbose=False)
        module = Classifier(MLP(784, [h1, h2]), optimizer="adam", lr=LR, scheduler="wsd")
        runs.append(("grid", train(f"grid {h1}x{h2}", module, dm, args.epochs, seed=seed), (h1, h2)))
    cap = autogrow.num_params(MLP(784, [grid[-1]] * 2))
    for kind, options in GROWTH.items():
        pl.seed_everything(seed, verbose=False)
        net = MLP(784, [grid[0] // 2] * 2)
        grow = AutoGrow(max_params=cap, seed=seed, **copy.deepcopy(options))
        grown = train(f"{kind} from {grid[0] // 2}x{grid[0] // 2}", Classifier(net, optimizer="adam", lr=LR), dm,
                      args.epochs, [grow], seed=seed)
        runs.append((kind, grown, (net.fc1.out_features, net.fc2.out_features)))
    runs += net2net_rows(args, dm, grid, seed)
    rows = [{"seed": seed, "kind": kind, "h1": h[0], "h2": h[1], "test_acc": r.test_acc, "best_val_acc": r.best_val_acc,
             "wall_s": r.wall, "train_flops": r.flops, "params": r.params, "events": len(r.events)}
            for kind, r, h in runs]
    n = len(grid) ** 2
    return rows, [runs[0][1], runs[n - 1][1], *(r for _, r, _ in runs[n: n + len(GROWTH)])]


def _ms(xs: list[float], scale: float = 1.0, spec: str = ".2f") -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{format(scale * statistics.mean(xs), spec)} ± {format(scale * sd, spec)}"


GROWTH_TEXT = {"growth": "`AutoGrow(max_params=<256x256's>)`, defaults", "growth by 5%": "the same with "
               "`deadline=Deadline(0.05, ratio=1.0)`", "resize": "the same with `shrink=Shrink()`"}


def growth_line(rows: list[dict[str, Any]], kind: str, best: tuple[str, int, int], grid_wall: float,
                grid_flops: float) -> str:
    """One growth run against the grid's best, paired by seed, and the target."""
    g = [r for r in rows if r["kind"] == kind]
    ref = {r["seed"]: r for r in rows if (r["kind"], r["h1"], r["h2"]) == best}
    gap = [100 * (r["test_acc"] - ref[r["seed"]]["test_acc"]) for r in g]
    wall = statistics.mean(r["wall_s"] for r in g) / grid_wall
    met = "met" if statistics.mean(gap) >= -0.3 and wall <= 0.2 else "missed"
    return (f"- {kind} ({GROWTH_TEXT[kind]}, from 32x32): {_ms(gap)} pp against the grid's best (paired by seed), at "
            f"{wall:.1%} of the grid's wall time and {statistics.mean(r['train_flops'] for r in g) / grid_flops:.1%} "
            f"of its FLOPs, ending at {statistics.mean(r['params'] for r in g):,.0f} parameters. Target (within 0.3 pp "
            f"at <= 20% of the grid's time): **{met}**")


def report(rows: list[dict[str, Any]], args: Any) -> str:
    configs = list(dict.fromkeys((r["kind"], r["h1"], r["h2"]) for r in rows if r["kind"] not in GROWTH))
    mean = lambda kind, h1, h2, key: statistics.mean(  # noqa: E731
        r[key] for r in rows if (r["kind"], r["h1"], r["h2"]) == (kind, h1, h2))
    grid = [c for c in configs if c[0] == "grid"]
    best = max(grid, key=lambda c: mean(*c, "best_val_acc"))
    grid_wall = sum(mean(*c, "wall_s") for c in grid)
    grid_flops = sum(mean(*c, "train_flops") for c in grid)
    lines = ["| run | test acc % | wall s | train GFLOPs | params |", "|---|---|---|---|---|"]
    for kind, h1, h2 in configs:
        mine = [r for r in rows if (r["kind"], r["h1"], r["h2"]) == (kind, h1, h2)]
        lines.append(f"| {kind} {h1}x{h2} | {_ms([r['test_acc'] for r in mine], 100)} | "
                     f"{_ms([r['wall_s'] for r in mine], 1, '.1f')} | {mean(kind, h1, h2, 'train_flops') / 1e9:.0f} | "
                     f"{mine[0]['params']:,} |")
    for kind in GROWTH:
        g = [r for r in rows if r["kind"] == kind]
        ends = ", ".join(sorted({f"{r['h1']}x{r['h2']}" for r in g}))
        lines.append(f"| {kind} (ends {ends}) | {_ms([r['test_acc'] for r in g], 100)} | "
                     f"{_ms([r['wall_s'] for r in g], 1, '.1f')} | "
                     f"{statistics.mean(r['train_flops'] for r in g) / 1e9:.0f} | "
                     f"{statistics.mean(r['params'] for r in g):,.0f} |")
    return (f"### Grid search vs one growth run (Fashion-MNIST MLP, Adam {LR:g}, {args.epochs} epochs, "
            f"{args.seeds} seed(s))\n\n"
            f"- grid best (by mean validation accuracy): {best[1]}x{best[2]}, "
            f"test {100 * mean(*best, 'test_acc'):.2f}%; "
            f"the whole grid: {grid_wall:.0f} s, {grid_flops / 1e9:.0f} GFLOPs per seed; the grid's best alone costs "
            f"{mean(*best, 'wall_s') / grid_wall:.1%} of its wall time\n"
            + "".join(growth_line(rows, kind, best, grid_wall, grid_flops) + "\n" for kind in GROWTH)
            + f"- net2net rows: the 64x64 net trained {max(1, args.epochs // 2)} epochs, widened, trained on with its "
            f"Adam state carried (wall time includes the base)\n\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = parser(__doc__, epochs=8, seeds=3)
    args = ap.parse_args(argv)
    out = finish_args(args, "grid")
    grid = (8, 16) if args.quick else GRID
    rows: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        seed_rows, curves = one_seed(args, fashion(args, seed=seed), grid, seed)
        rows += seed_rows
        if seed == 0:
            plot(out, "grid", curves, "Grid corners vs growth run (seed 0)")
    write(out, "grid", rows, report(rows, args))
    return rows


if __name__ == "__main__":
    main()
