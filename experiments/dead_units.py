"""Why the grown Fashion-MNIST MLP ends below scratch: fit and dead units, by the growth that added them.

For each seed: the grown run of ``suite_pays --model mlp`` (the defaults, or a ``--variant``), the 256x256 net from
scratch and, with ``--baselines``, the same on the grown run's FLOPs. After training: accuracy and loss on the
whole training set (under-fitting or a generalisation gap?), and per hidden layer the fraction of dead units (a ReLU
never active on 4096 training images), split by the units' birth (original 32, then each growth's), and the
number of principal components that hold 99% of the activations' variance.

    python -m autogrow.experiments.dead_units --seeds 3 --baselines
    python -m autogrow.experiments.dead_units --seeds 3 --variant fresh-steps
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F
from autogrow.experiments import suite_pays
from autogrow.experiments.common import finish_args, parser

BIRTHS = ((0, 32), (32, 64), (64, 128), (128, 256))  # 32 -> 64 -> 128 -> 256: new units are appended


def measure(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Training-set fit and, per hidden layer, dead units by birth and the 99%-variance rank."""
    module.eval()
    acts: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        logits = torch.cat([module(x[i:i + 4096]) for i in range(0, len(x), 4096)])
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: acts.__setitem__(n, o.detach()))
                 for n, m in module.model.named_children() if n.startswith("act")]
        module(x[:4096])  # the activations kept: 4096 images
    for h in hooks:
        h.remove()
    out: dict[str, Any] = {"train_acc": float((logits.argmax(1) == y).float().mean()),
                           "train_loss": float(F.cross_entropy(logits, y))}
    for name, a in acts.items():
        dead = (a.amax(0) <= 0).float()
        var = torch.linalg.svdvals(a - a.mean(0)) ** 2
        out[name] = {"dead": float(dead.mean()),
                     "dead_by_birth": {f"{lo}-{hi}": float(dead[lo:hi].mean()) for lo, hi in BIRTHS if hi <= len(dead)},
                     "rank99": int((var.cumsum(0) / var.sum() < 0.99).sum()) + 1}
    return out


def _mean(rs: list[dict[str, Any]], *path: str) -> float:
    vals = []
    for r in rs:
        for key in path:
            r = r[key]
        vals.append(float(r))  # type: ignore[arg-type]
    return sum(vals) / len(vals)


def _dead(rs: list[dict[str, Any]], layer: str) -> str:
    births = ", ".join(f"{100 * _mean(rs, layer, 'dead_by_birth', k):.0f}" for k in rs[0][layer]["dead_by_birth"])
    return f"{100 * _mean(rs, layer, 'dead'):.1f} % ({births})"


def report(rows: list[dict[str, Any]]) -> str:
    """Mean over seeds per configuration: test and training fit, dead units (all, and by birth), 99%-variance rank."""
    lines = ["| run | seeds | test acc % | train acc % | train loss | dead units, layer 1 (by birth: orig., 1st, 2nd, "
             "3rd growth) | dead units, layer 2 (by birth) | rank99 layer 1 / 2 |", "|---" * 8 + "|"]
    for config in dict.fromkeys(r["config"] for r in rows):
        rs = [r for r in rows if r["config"] == config]
        lines.append(f"| {config} | {len(rs)} | {100 * _mean(rs, 'test_acc'):.2f} | {100 * _mean(rs, 'train_acc'):.2f} "
                     f"| {_mean(rs, 'train_loss'):.3f} | {_dead(rs, 'act1')} | {_dead(rs, 'act2')} | "
                     f"{_mean(rs, 'act1', 'rank99'):.0f} / {_mean(rs, 'act2', 'rank99'):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = parser(__doc__, epochs=10, seeds=3)
    ap.add_argument("--variant", choices=sorted(suite_pays.VARIANTS), default=None)
    ap.add_argument("--baselines", action="store_true", help="also scratch and scratch on the grown run's FLOPs")
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args(argv)
    out = finish_args(args, "dead_units")
    torch.set_num_threads(1)
    s, rows = suite_pays.SETTINGS["mlp"], []
    kept: dict[str, torch.nn.Module] = {}
    train = suite_pays.train
    suite_pays.train = lambda label, module, *a, **kw: kept.__setitem__(label, module) or train(label, module, *a, **kw)
    try:
        for seed in range(args.seeds):
            runs = {f"grown ({args.variant or 'defaults'})": suite_pays.run_grown(
                s, args, seed, args.lr, **suite_pays.VARIANTS.get(args.variant or "", {}))}
            if args.baselines:
                runs["scratch"] = suite_pays.run_fixed(s, args, seed, args.lr, s.final, None)
                runs["scratch @ budget"] = suite_pays.run_fixed(s, args, seed, args.lr, s.final, runs[
                    next(iter(runs))].flops)
            dm = suite_pays.data(s, args, seed)
            dm.setup()
            x, y = dm.train_dataloader().dataset.tensors
            for (config, run), module in zip(runs.items(), kept.values()):
                rows.append({"config": config, "seed": seed, "test_acc": run.test_acc, **measure(module, x, y)})
                print(json.dumps(rows[-1]), flush=True)
            kept.clear()
    finally:
        suite_pays.train = train
    name = f"dead_units_{args.variant or 'defaults'}"
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    (out / f"{name}.md").write_text(report(rows) + "\n")
    print(report(rows))
    return rows


if __name__ == "__main__":
    main()
