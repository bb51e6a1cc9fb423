"""Suite 1: the keras Net2Net example on Fashion-MNIST (MNIST with --mnist).

Teacher: the seed CNN (conv 64 - pool - conv 64 - pool - fc 64 - fc 10), SGD lr 0.01 momentum 0.9,
3 epochs. Students start from the trained teacher and train 3 epochs with a fresh SGD at lr 0.001:
(1) conv1 and fc1 widened 64 -> 128 by random padding, (2) by Net2WiderNet, (3) an extra conv after
conv2 and an extra fc after fc1 with random init, (4) with Net2DeeperNet (identity). Reported:
validation loss per epoch, with the students' epoch 0 (before training: equal to the teacher's for
the function-preserving ones), mean and spread over seeds.

Run: ``python -m autogrow.experiments.suite_net2net [--seeds 3] [--train-subset 12000] [--mnist]``
"""

from __future__ import annotations

import copy

import pytorch_lightning as pl
from autogrow.experiments.common import Run, fashion, finish_args, mean_std, parser, plot, train, write
from autogrow.experiments.data import MNISTDataModule
from autogrow.experiments.models import Classifier, SeedCNN

import autogrow

STUDENTS = ("wider random-pad", "net2wider", "deeper random-init", "net2deeper")


def student(teacher: SeedCNN, kind: str, seed: int) -> SeedCNN:
    net = copy.deepcopy(teacher)
    if "wider" in kind:
        init = "random" if "random" in kind else "net2wider"
        split = 0.0 if init == "random" else 0.5  # exact and symmetry-breaking
        autogrow.widen(net, "conv1", 128, init=init, split=split, generator=seed)
        autogrow.widen(net, "fc1", 128, init=init, split=split, generator=seed + 1)
    else:
        init = "random" if "random" in kind else "identity"
        autogrow.deepen(net, "conv2", init=init, generator=seed)
        autogrow.deepen(net, "fc1", init=init, generator=seed + 1)
    return net


def main(argv: list[str] | None = None) -> list[dict]:
    ap = parser(__doc__, epochs=3, seeds=3, train_subset=12000)
    ap.add_argument("--mnist", action="store_true", help="MNIST instead of Fashion-MNIST (files needed)")
    args = ap.parse_args(argv)
    out = finish_args(args, "net2net")
    rows, runs = [], []
    for seed in range(args.seeds):
        if args.mnist:
            dm = MNISTDataModule(data_dir=args.data_dir, flatten=False, seed=seed, train_subset=args.train_subset)
        else:
            dm = fashion(args, flatten=False, seed=seed)
        pl.seed_everything(seed, verbose=False)
        channels, hidden = (8, 8) if args.quick else (64, 64)
        teacher_net = SeedCNN(channels=channels, hidden=hidden)
        teacher = train("(0) teacher", Classifier(teacher_net, lr=0.01), dm, args.epochs, seed=seed)
        results: list[Run] = [teacher]
        for i, kind in enumerate(STUDENTS, 1):
            net = student(teacher_net, kind, seed * 100 + i)
            results.append(train(f"({i}) {kind}", Classifier(net, lr=0.001), dm, args.epochs, seed=seed,
                                 validate_first=True))
        for r in results:
            row = {"seed": seed, "model": r.label, "e0": r.extra.get("epoch0", {}).get("val_loss"),
                   **{f"e{e['epoch']}": e["val_loss"] for e in r.evals}, "test_acc": r.test_acc,
                   "params": r.params, "wall_s": r.wall}
            rows.append(row)
        runs.extend(results if seed == 0 else [])
    labels = [r["model"] for r in rows if r["seed"] == 0]
    head = "| model | " + " | ".join(f"epoch {e}" for e in range(args.epochs + 1)) + " | test acc | params |"
    lines = [head, "|---" * (args.epochs + 4) + "|"]
    for label in labels:
        mine = [r for r in rows if r["model"] == label]
        cells = []
        for e in range(args.epochs + 1):
            vals = [r[f"e{e}"] for r in mine if r.get(f"e{e}") is not None]
            cells.append(mean_std(vals) if vals else "")
        cells.append(mean_std([r["test_acc"] for r in mine]))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mine[0]['params']:,} |")
    data = "MNIST" if args.mnist else "Fashion-MNIST"
    md = (f"### Net2Net (keras example) on {data}: validation loss per epoch\n\nmean ± std over {args.seeds} "
          f"seed(s); train subset {args.train_subset}; teacher lr 0.01, students lr 0.001 (SGD, momentum 0.9); "
          f"epoch 0 = student before training\n\n" + "\n".join(lines))
    write(out, "net2net", rows, md)
    plot(out, "net2net", runs, f"Net2Net on {data} (seed 0)")
    return rows


if __name__ == "__main__":
    main()
