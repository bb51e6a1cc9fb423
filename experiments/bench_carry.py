"""Optimizer state across a widen: ``carry`` vs ``reset`` on a real task (printed, not a test).

A Fashion-MNIST MLP (784-64-10) trains ``--steps`` steps; it is then widened 64 -> 128 (exact
Net2WiderNet) and training continues on the same batches along two branches: the optimizer state
carried across (autogrow) and reset (what most Net2Net ports do). Printed: mean training loss over
the 50 steps before the widen and the 50 after, and their ratio (carry should stay <= 1.01).

Run: ``python -m autogrow.experiments.bench_carry [--steps 600] [--data-dir DIR]``
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from autogrow.experiments.data import FashionMNISTDataModule

import autogrow

OPTIMIZERS: dict[str, Callable[[object], torch.optim.Optimizer]] = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
}


def run(make_opt: Callable[[object], torch.optim.Optimizer], batches: list, steps: int, seed: int,
        window: int = 50) -> dict[str, float]:
    torch.manual_seed(seed)  # a script: the network's default init may use the global RNG
    net = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = make_opt(net.parameters())

    def train(model: nn.Module, o: torch.optim.Optimizer, bs: list) -> list[float]:
        losses = []
        for x, y in bs:
            o.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            o.step()
            losses.append(loss.item())
        return losses

    before = train(net, opt, batches[:steps])[-window:]
    out = {"before": sum(before) / window}
    after_batches = batches[steps:steps + window]
    m, o = copy.deepcopy((net, opt))
    out["control"] = sum(train(m, o, after_batches)) / window  # no growth, same batches
    for state in ("carry", "reset"):
        m, o = copy.deepcopy((net, opt))  # one deepcopy: the copied optimizer holds the copied parameters
        autogrow.widen(m, "0", 128, optimizer=o, state=state, generator=seed)
        losses = train(m, o, after_batches)
        out[state] = sum(losses) / window
        out[f"{state}_peak10"] = max(losses[:10])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600, help="training steps before the widen")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=3, help="runs averaged (network init and widen mapping)")
    args = ap.parse_args(argv)
    dm = FashionMNISTDataModule(data_dir=args.data_dir, batch_size=args.batch_size, seed=0)
    loader = dm.train_dataloader()
    batches: list = []
    while len(batches) < args.steps + 50:
        batches.extend(loader)
    print(f"Fashion-MNIST MLP 784-64-10 -> 784-128-10 after {args.steps} steps (batch {args.batch_size})")
    print(f"mean training loss over the 50 steps before the widen, and over the 50 after (same batches for the\n"
          f"no-growth control and both branches), averaged over {args.seeds} seeds; ratios: after / before, "
          "after / control")
    print(f"{'optimizer':<14} {'before':>7} {'control':>8} | {'carry':>7} {'/before':>7} {'/ctrl':>6} | "
          f"{'reset':>7} {'/before':>7} {'/ctrl':>6} | {'peak of 10 steps: carry':>23} {'reset':>6}")
    for name, make in OPTIMIZERS.items():
        runs = [run(make, batches, args.steps, seed) for seed in range(args.seeds)]
        r = {k: sum(x[k] for x in runs) / len(runs) for k in runs[0]}
        print(f"{name:<14} {r['before']:>7.4f} {r['control']:>8.4f} | {r['carry']:>7.4f} "
              f"{r['carry'] / r['before']:>7.3f} {r['carry'] / r['control']:>6.3f} | {r['reset']:>7.4f} "
              f"{r['reset'] / r['before']:>7.3f} {r['reset'] / r['control']:>6.3f} | {r['carry_peak10']:>23.4f} "
              f"{r['reset_peak10']:>6.4f}")

if __name__ == "__main__":
    main()
