"""Suite 4: ablations of one AutoGrow run (Fashion-MNIST MLP from 32x32, Adam 1e-3).

* optimizer state across growth: ``carry`` vs ``reset`` — mean training loss over the 50 steps after
  each growth divided by the 50 steps before;
* symmetry breaking: exact uneven split (the default) vs exact even split (copies stay copies) vs
  keras-style noise (inexact) vs random init (the baseline);
* when to grow: plateau trigger vs a fixed schedule (every 2 epochs).

Run: ``python -m autogrow.experiments.suite_ablations [--seeds 2] [--epochs 10]``
"""

from __future__ import annotations

import statistics

import pytorch_lightning as pl
from autogrow.experiments.common import Run, fashion, finish_args, mean_std, parser, plot, train, write
from autogrow.experiments.models import MLP
from autogrow.experiments.suite_grid import classifier, growth_callback, growth_sizes

from autogrow.actions import Widen
from autogrow.plateau import EveryN

VARIANTS: dict[str, dict] = {
    "carry (default)": {},
    "reset": {"optimizer_state": "reset"},
    "even split": {"grow": Widen(split=0.0)},
    "noise 0.05": {"grow": Widen(split=0.0, noise=0.05)},
    "random init": {"grow": Widen(init="random")},
    "fixed schedule": {"trigger": EveryN(every=2)},
}


def spike(run: Run, window: int = 50) -> float | None:
    """Mean over growth events of (loss in the `window` steps after) / (loss in the `window` before)."""
    ratios = []
    for e in run.events:
        s = e.step
        before, after = run.train_losses[max(0, s - window):s], run.train_losses[s:s + window]
        if before and after:
            ratios.append(statistics.mean(after) / statistics.mean(before))
    return statistics.mean(ratios) if ratios else None


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser(__doc__, epochs=10, seeds=2).parse_args(argv)
    out = finish_args(args, "ablations")
    start, cap = growth_sizes(args.quick)
    rows, plots = [], []
    for seed in range(args.seeds):
        dm = fashion(args, seed=seed)
        for label, kw in VARIANTS.items():
            pl.seed_everything(seed, verbose=False)
            grow = growth_callback(cap, seed=seed, **kw)
            run = train(label, classifier(MLP(784, [start, start])), dm, args.epochs, [grow], seed=seed)
            rows.append({"seed": seed, "variant": label, "test_acc": run.test_acc, "best_val_acc": run.best_val_acc,
                         "events": len(run.events), "params": run.params, "train_flops": run.flops,
                         "loss_after_over_before": spike(run),
                         "max_preservation_error": max((e.preservation_error or 0.0 for e in run.events),
                                                       default=None)})
            if seed == 0:
                plots.append(run)

    def cell(label: str, key: str, fmt: str = "{:.4f}") -> str:
        vals = [r[key] for r in rows if r["variant"] == label and r[key] is not None]
        if not vals:
            return "n/a"
        return mean_std(vals) if fmt == "{:.4f}" else fmt.format(statistics.mean(vals))

    lines = ["| variant | test acc | best val acc | growth events | final params | loss after/before growth "
             "| max preservation error |", "|---|---|---|---|---|---|---|"]
    for label in VARIANTS:
        lines.append(f"| {label} | {cell(label, 'test_acc')} | {cell(label, 'best_val_acc')} | "
                     f"{cell(label, 'events', '{:.1f}')} | {cell(label, 'params', '{:,.0f}')} | "
                     f"{cell(label, 'loss_after_over_before')} | {cell(label, 'max_preservation_error', '{:.1e}')} |")
    md = (f"### Ablations (Fashion-MNIST MLP from {start}x{start}, Adam 1e-3, {args.epochs} epochs, {args.seeds} "
          f"seeds)\n\n'loss after/before growth': mean training loss over the 50 steps after each growth divided "
          f"by the 50 steps before (lower is better; >1 is a spike).\n\n" + "\n".join(lines))
    write(out, "ablations", rows, md)
    plot(out, "ablations", plots, "Ablations (seed 0)")
    return rows


if __name__ == "__main__":
    main()
