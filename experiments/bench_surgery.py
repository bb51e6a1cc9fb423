"""Benchmark: cost of growth next to a plain copy of the same tensors (printed ratios, not a test).

* surgery: ``plan_widen(...).apply()`` on MLPs and CNNs of ~1M / 10M / 50M parameters (the middle
  layer x1.5), against cloning every parameter of the model. Target: <= 3x.
* optimizer: ``grow_optimizer`` for Adam after that widening, against cloning every state tensor.

Run: ``python -m autogrow.experiments.bench_surgery [--sizes 1 10 50] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn

import autogrow


def mlp(h: int) -> tuple[nn.Module, str, int, torch.Tensor]:
    net = nn.Sequential(nn.Linear(1024, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))
    return net, "2", h * 3 // 2, torch.randn(8, 1024)


def cnn(c: int) -> tuple[nn.Module, str, int, torch.Tensor]:
    net = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1),
                        nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * c, 10))
    return net, "3", c * 3 // 2, torch.randn(2, 3, 8, 8)


# hidden width / channels giving ~1M, 10M, 50M parameters
SIZES = {1: {"mlp": 600, "cnn": 235}, 10: {"mlp": 2700, "cnn": 745}, 50: {"mlp": 6600, "cnn": 1666}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 50], choices=sorted(SIZES))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'model':<5} {'params':>8} | {'clone ms':>9} {'widen ms':>9} {'ratio':>6} | "
          f"{'state copy ms':>13} {'remap ms':>9} {'ratio':>6} | max|f-g|")
    for size in args.sizes:
        for kind, build in (("mlp", mlp), ("cnn", cnn)):
            print(bench_one(kind, *build(SIZES[size][kind]), args.repeats))


def bench_one(kind: str, net: nn.Module, target: str, width: int, x: torch.Tensor, repeats: int) -> str:
    net.eval()
    n_params = autogrow.num_params(net)
    # Side by side under the same allocator state: each repeat times a clone of a fresh copy, frees it,
    # then times the widening of that same copy.
    clone_times, widen_times = [], []
    for _ in range(repeats):
        m = copy.deepcopy(net)
        t0 = time.perf_counter()
        clones = [p.detach().clone() for p in m.parameters()]
        clone_times.append(time.perf_counter() - t0)
        del clones
        t0 = time.perf_counter()
        autogrow.plan_widen(m, target, width, generator=0).apply()
        widen_times.append(time.perf_counter() - t0)
    t_clone, t_widen = statistics.median(clone_times), statistics.median(widen_times)
    # optimizer: Adam after one step, remapped after the same widening
    opt = torch.optim.Adam(net.parameters())
    net(x).square().mean().backward()
    opt.step()
    state_times, remap_times = [], []
    for _ in range(repeats):
        m, o = copy.deepcopy((net, opt))
        t0 = time.perf_counter()
        copies = {p: {k: v.clone() for k, v in st.items()} for p, st in o.state.items()}
        state_times.append(time.perf_counter() - t0)
        del copies
        g = autogrow.widen(m, target, width, generator=0)
        t0 = time.perf_counter()
        autogrow.grow_optimizer(o, g, m)
        remap_times.append(time.perf_counter() - t0)
    t_state, t_remap = statistics.median(state_times), statistics.median(remap_times)
    grown = copy.deepcopy(net)
    with torch.no_grad():
        ref = net(x)
        autogrow.widen(grown, target, width, generator=0)
        err = float((grown(x) - ref).abs().max())
    return (f"{kind:<5} {n_params / 1e6:>7.1f}M | {t_clone * 1e3:>9.1f} {t_widen * 1e3:>9.1f} "
            f"{t_widen / t_clone:>6.2f} | {t_state * 1e3:>13.1f} {t_remap * 1e3:>9.1f} "
            f"{t_remap / t_state:>6.2f} | {err:.1e}")

if __name__ == "__main__":
    main()
