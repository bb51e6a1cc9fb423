"""Suite 5: dynamic node creation (Ash 1989) vs the best fixed size (Fashion-MNIST, one hidden layer).

The DNC run starts with 4 hidden units and adds 4 whenever the validation loss improved by less than
``threshold`` (relative to its value at the last growth) over a window of 2 evaluations; it stops
growing when a growth does not beat the pre-growth best within 3 evaluations, and rolls that growth
back. Fixed sizes 4..128 are trained from scratch for the same epochs.

Run: ``python -m autogrow.experiments.suite_dnc [--epochs 15]``
"""

from __future__ import annotations

import pytorch_lightning as pl
from autogrow.callbacks import AutoGrow
from autogrow.experiments.common import fashion, finish_args, parser, plot, table, train, write
from autogrow.experiments.models import MLP, Classifier

from autogrow.actions import Widen
from autogrow.plateau import DynamicNodeCreation

FIXED = (4, 8, 16, 32, 64, 128)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = parser(__doc__, epochs=15, seeds=1)
    ap.add_argument("--threshold", type=float, default=0.05)
    args = ap.parse_args(argv)
    out = finish_args(args, "dnc")
    fixed = FIXED[:3] if args.quick else FIXED
    dm = fashion(args)
    rows, runs = [], []
    pl.seed_everything(0, verbose=False)
    net = MLP(784, [4])
    grow = AutoGrow(monitor="val_loss", trigger=DynamicNodeCreation(window=2, threshold=args.threshold),
                    grow=Widen(units=4), stop_patience=3, rollback=True)
    dnc = train("dynamic node creation", Classifier(net, optimizer="adam", lr=1e-3), dm, args.epochs, [grow])
    rows.append({"run": "dnc", "hidden": net.fc1.out_features, "test_acc": dnc.test_acc,
                 "best_val_acc": dnc.best_val_acc, "wall_s": dnc.wall, "train_flops": dnc.flops,
                 "events": len(dnc.events), "stopped": grow.stop_message or None})
    runs.append(dnc)
    for h in fixed:
        pl.seed_everything(0, verbose=False)
        run = train(f"fixed {h}", Classifier(MLP(784, [h]), optimizer="adam", lr=1e-3), dm, args.epochs)
        rows.append({"run": "fixed", "hidden": h, "test_acc": run.test_acc, "best_val_acc": run.best_val_acc,
                     "wall_s": run.wall, "train_flops": run.flops, "events": 0, "stopped": None})
        runs.append(run)
    best = max((r for r in rows if r["run"] == "fixed"), key=lambda r: r["best_val_acc"])
    d = rows[0]
    shown = [{**r, "gflops": r["train_flops"] / 1e9} for r in rows]
    lines = table(shown, [("run", "run", "s"), ("hidden units", "hidden", "d"), ("test acc", "test_acc", ".4f"),
                          ("best val acc", "best_val_acc", ".4f"), ("wall s", "wall_s", ".1f"),
                          ("train GFLOPs", "gflops", ".2f")])
    md = (f"### Dynamic node creation vs fixed sizes (Fashion-MNIST, one hidden layer, Adam 1e-3, {args.epochs} "
          f"epochs)\n\n- DNC (window 2, threshold {args.threshold}, +4 units, stop after 3, rollback): 4 -> "
          f"{d['hidden']} units in {d['events']} events (rollbacks included); "
          f"stopped: {d['stopped'] or 'no'}; test accuracy {d['test_acc']:.4f}\n"
          f"- best fixed size (by validation accuracy): {best['hidden']} units, test accuracy {best['test_acc']:.4f}"
          f"\n\n" + lines)
    write(out, "dnc", rows, md)
    plot(out, "dnc", runs[:1] + runs[-3:], "Dynamic node creation vs fixed sizes")
    return rows


if __name__ == "__main__":
    main()
