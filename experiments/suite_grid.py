"""Suite 2: grid search over widths vs one AutoGrow run (Fashion-MNIST, two-hidden-layer MLP).

* grid: every (h1, h2) in {64, 128, 256}^2 trained from scratch for ``--epochs``;
* growth: one run from (32, 32), widened x2 (up to 256) whenever validation loss plateaus;
* the seed's variant: a (64, 64) net trained half the epochs, widened by Net2WiderNet into each grid
  size and trained the other half.

Reported: each configuration's test accuracy, wall time and training FLOPs; the grid's best and the
grid's total cost; where the growth run ended (size, accuracy, cost).

Run: ``python -m autogrow.experiments.suite_grid [--epochs 8]``
"""

from __future__ import annotations

import copy
import itertools

import pytorch_lightning as pl
from autogrow.callbacks import AutoGrow
from autogrow.experiments.common import Run, fashion, finish_args, parser, plot, table, train, write
from autogrow.experiments.models import MLP, Classifier

import autogrow
from autogrow.actions import Widen
from autogrow.plateau import Plateau

GRID = (64, 128, 256)


def classifier(net: MLP) -> Classifier:
    return Classifier(net, optimizer="adam", lr=1e-3)


def growth_sizes(quick: bool) -> tuple[int, int]:
    """(start, cap) of the grown MLPs' hidden layers: half the smallest and the largest grid width."""
    grid = (8, 16) if quick else GRID
    return grid[0] // 2, grid[-1]


def growth_callback(max_width: int, **overrides: object) -> AutoGrow:
    """The growth configuration shared by suites 2-4 (``overrides`` for the ablations)."""
    trigger = Plateau(patience=1, min_delta=0.01, relative=True, warmup=1)
    return AutoGrow(**{"monitor": "val_loss", "trigger": trigger, "grow": Widen(factor=2.0), "max_width": max_width,
                       **overrides})


def main(argv: list[str] | None = None) -> list[dict]:
    ap = parser(__doc__, epochs=8, seeds=1)
    args = ap.parse_args(argv)
    out = finish_args(args, "grid")
    grid = (8, 16) if args.quick else GRID
    start, cap = growth_sizes(args.quick)
    dm = fashion(args)
    rows: list[dict] = []

    def add(kind: str, run: Run, h: tuple[int, int], cost_extra: tuple[float, float] = (0.0, 0.0)) -> None:
        rows.append({"kind": kind, "h1": h[0], "h2": h[1], "test_acc": run.test_acc, "best_val_acc": run.best_val_acc,
                     "wall_s": run.wall + cost_extra[0], "train_flops": run.flops + cost_extra[1],
                     "params": run.params, "events": len(run.events)})

    runs = []
    for h1, h2 in itertools.product(grid, grid):
        pl.seed_everything(0, verbose=False)
        run = train(f"grid {h1}x{h2}", classifier(MLP(784, [h1, h2])), dm, args.epochs)
        add("grid", run, (h1, h2))
        runs.append(run)
    pl.seed_everything(0, verbose=False)
    grow_net = MLP(784, [start, start])
    grown = train(f"growth from {start}x{start}", classifier(grow_net), dm, args.epochs,
                  [growth_callback(cap)])
    add("growth", grown, (grow_net.fc1.out_features, grow_net.fc2.out_features))

    # The seed's variant: a small trained net, widened by Net2Net into each grid size.
    half = max(1, args.epochs // 2)
    pl.seed_everything(0, verbose=False)
    base_net = MLP(784, [grid[0], grid[0]])
    base = train(f"base {grid[0]}x{grid[0]}", classifier(base_net), dm, half)
    for h1, h2 in itertools.product(grid, grid):
        net = copy.deepcopy(base_net)
        for name, h in (("fc1", h1), ("fc2", h2)):
            if h > grid[0]:
                autogrow.widen(net, name, h, split=0.5, generator=h)
        run = train(f"net2net {h1}x{h2}", classifier(net), dm, args.epochs - half)
        add("net2net", run, (h1, h2), (base.wall, base.flops))

    grid_rows = [r for r in rows if r["kind"] == "grid"]
    best = max(grid_rows, key=lambda r: r["best_val_acc"])
    g = next(r for r in rows if r["kind"] == "growth")
    shown = [{**r, "gflops": r["train_flops"] / 1e9} for r in rows]
    lines = table(shown, [("kind", "kind", "s"), ("h1", "h1", "d"), ("h2", "h2", "d"), ("test acc", "test_acc", ".4f"),
                          ("wall s", "wall_s", ".1f"), ("train GFLOPs", "gflops", ".1f"), ("params", "params", ",")])
    total_wall, total_flops = sum(r["wall_s"] for r in grid_rows), sum(r["train_flops"] for r in grid_rows)
    md = (f"### Grid search vs one growth run (Fashion-MNIST MLP, Adam 1e-3, {args.epochs} epochs each)\n\n"
          f"- grid best (by validation accuracy): {best['h1']}x{best['h2']}, test accuracy {best['test_acc']:.4f}; "
          f"the whole grid cost {total_wall:.0f} s, {total_flops / 1e9:.0f} GFLOPs\n"
          f"- growth run: {start}x{start} -> {g['h1']}x{g['h2']} in {g['events']} events, test accuracy "
          f"{g['test_acc']:.4f}, cost {g['wall_s']:.0f} s, {g['train_flops'] / 1e9:.0f} GFLOPs "
          f"({g['train_flops'] / total_flops:.1%} of the grid's FLOPs)\n"
          f"- net2net rows: a {grid[0]}x{grid[0]} net trained {half} epochs, widened into each size, trained "
          f"{args.epochs - half} more (cost includes the base)\n\n" + lines)
    write(out, "grid", rows, md)
    plot(out, "grid", [runs[0], runs[-1], grown], "Grid corners vs growth run")
    return rows


if __name__ == "__main__":
    main()
