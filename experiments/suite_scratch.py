"""Suite 3: grow from small vs train the final architecture from scratch (Fashion-MNIST MLP).

For each seed: an AutoGrow run from (32, 32) (x2 on plateau, up to 256), then the architecture it
ended at trained from scratch with the same optimizer and schedule for the same epochs. Reported:
the scratch run's best validation accuracy, the time and training FLOPs each run needed to first
reach it (or "not reached"), and both final test accuracies.

Run: ``python -m autogrow.experiments.suite_scratch [--seeds 3] [--epochs 10]``
"""

from __future__ import annotations

import pytorch_lightning as pl
from autogrow.experiments.common import fashion, finish_args, mean_std, parser, plot, train, write
from autogrow.experiments.models import MLP
from autogrow.experiments.suite_grid import classifier, growth_callback, growth_sizes


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser(__doc__, epochs=10, seeds=3).parse_args(argv)
    out = finish_args(args, "scratch")
    start, cap = growth_sizes(args.quick)
    rows, plots = [], []
    for seed in range(args.seeds):
        dm = fashion(args, seed=seed)
        pl.seed_everything(seed, verbose=False)
        net = MLP(784, [start, start])
        grown = train("grown", classifier(net), dm, args.epochs, [growth_callback(cap)], seed=seed)
        arch = [net.fc1.out_features, net.fc2.out_features]
        pl.seed_everything(seed, verbose=False)
        scratch = train(f"scratch {arch[0]}x{arch[1]}", classifier(MLP(784, arch)), dm, args.epochs, seed=seed)
        target = scratch.best_val_acc
        for run in (grown, scratch):
            hit = run.first_reaching(target)
            rows.append({"seed": seed, "run": "grown" if run is grown else "scratch", "arch": f"{arch[0]}x{arch[1]}",
                         "target_val_acc": target, "epoch_to_target": hit["epoch"] if hit else None,
                         "time_to_target_s": hit["time"] if hit else None,
                         "flops_to_target": hit["train_flops"] if hit else None, "best_val_acc": run.best_val_acc,
                         "test_acc": run.test_acc, "wall_s": run.wall, "train_flops": run.flops,
                         "events": len(run.events)})
        if seed == 0:
            plots = [grown, scratch]

    def cell(run: str, key: str, scale: float = 1.0) -> str:
        vals = [r[key] / scale for r in rows if r["run"] == run and r[key] is not None]
        n = sum(1 for r in rows if r["run"] == run)
        return (mean_std(vals) if vals else "n/a") + (f" ({len(vals)}/{n} reached)" if len(vals) < n else "")

    lines = ["| run | test acc | best val acc | epochs to target | s to target | GFLOPs to target | total GFLOPs |",
             "|---|---|---|---|---|---|---|"]
    for run in ("grown", "scratch"):
        lines.append(f"| {run} | {cell(run, 'test_acc')} | {cell(run, 'best_val_acc')} | "
                     f"{cell(run, 'epoch_to_target')} | {cell(run, 'time_to_target_s')} | "
                     f"{cell(run, 'flops_to_target', 1e9)} | {cell(run, 'train_flops', 1e9)} |")
    archs = ", ".join(sorted({r["arch"] for r in rows}))
    md = (f"### Grow vs fixed size from scratch (Fashion-MNIST MLP, Adam 1e-3, {args.epochs} epochs, "
          f"{args.seeds} seeds)\n\nThe growth run starts at {start}x{start}; the scratch run trains the architecture "
          f"the growth run ended at ({archs}). Target: the scratch run's best validation accuracy.\n\n"
          + "\n".join(lines))
    write(out, "scratch", rows, md)
    plot(out, "scratch", plots, "Grown vs from scratch (seed 0)")
    return rows


if __name__ == "__main__":
    main()
