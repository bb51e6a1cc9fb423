"""A fast screen of growth recipes in plain PyTorch: the library's surgery in a hand-written training loop.

``suite_pays`` measures a recipe through the Lightning callback, minutes per run. This screen trains the same
networks on the same data split (``fashion``: 54k/6k by seed, t10k test), batch 128, Adam, the LR held and then
decayed linearly to zero, in a plain loop: about 30 s per MLP run on one core, so that schedules and remedies can
be compared on several seeds and on long runs. Each growth doubles every hidden layer (what the callback's ``all``
policy does on these nets) with ``autogrow.widen`` (fresh units, Adam state carried), at fixed fractions of the
run's steps: ``even`` spreads them up to the deadline, ``geometric`` passes the small sizes in the first percent
(``Deadline(0.7, ratio=0.125)``). There is no plateau trigger: over long runs the callback's plateaus bring growth
earlier than the deadline. FLOPs are counted per step with ``torch.utils.flop_counter`` (training = 3x
forward) and reported over the full-size net's for the same epochs.

    python -m autogrow.experiments.screen --model mlp --epochs 30 --seeds 3
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from autogrow.experiments.common import fashion, finish_args, mean_std, parser, table, write
from autogrow.experiments.models import MLP, ConvNet
from autogrow.experiments.transformers import forward_flops

import autogrow
from autogrow.lr import shrink_perturb
from autogrow.ramp import advance_ramps
from autogrow.shapes import eval_mode


@dataclass(frozen=True)
class Model:
    name: str
    build: Callable[[int], nn.Module]
    targets: tuple[str, ...]  # the layers that double at each growth
    start: int
    final: int
    lr: float
    flatten: bool
    train_subset: int | None = None
    head: str = "out"  # the output layer (a logits-cooling recipe scales it)


MODELS = {
    "mlp": Model("MLP 784-h-h-10", lambda h: MLP(784, [h, h]), ("fc1", "fc2"), 32, 256, 1e-3, True),
    "cnn": Model("ConvNet (c, c, 2c, 2c channels)", ConvNet, ("conv1", "conv2", "conv3", "conv4"), 4, 16, 3e-3,
                 False, 10000),
}


@dataclass(frozen=True)
class Recipe:
    """One configuration: ``width`` None starts at the model's start width and grows to its final width; -1 trains
    a fixed net of the final width, -2 one of half of it.

    ``start``: the width to start from (None: the model's; -2: half the final width); ``schedule``: "even" (growths
    at deadline * k / n), "geometric" (deadline * 0.125 ** (n - k)) or "at" (all of them at the deadline: one jump);
    ``steps``: the fraction of the run's steps trained (a budget baseline); ``decay``: the LR decays linearly to
    zero over this last fraction of the run, restarting from the peak at a growth inside it (``GrowthLR``'s rule,
    without its re-warm: the decay starts no earlier than the latest growth so far), or, with ``hold``, held at the
    peak until the last growth, or, with ``cycle``, the same hold-then-decay within every phase between growths
    (each size annealed, then grown at the peak LR); ``init``: the new units (``widen``'s; ``"net2wider"``: copies,
    split 0.5 as the callback's ``Widen``); ``shrink_perturb``: (shrink, noise) after each growth, or only the last
    (``last_only``); ``new_state``: the fresh units' Adam state (``widen``'s: ``"zero"``, or ``"mean"``: second
    moments at the old units' mean, no oversized first steps); ``cool``: after each growth the output layer's weights
    and bias are multiplied by this: the logits cooled, the predictions (their argmax) kept, not function-preserving.
    """

    width: int | None = None
    start: int | None = None
    schedule: str = "even"
    deadline: float = 0.6
    steps: float = 1.0
    decay: float = 0.4
    hold: bool = False
    cycle: bool = False
    reset: bool = False
    init: str = "auto"
    shrink_perturb: tuple[float, float] | None = None
    last_only: bool = False
    new_state: str = "zero"
    cool: float | None = None

    def growth_points(self, n: int) -> list[float]:
        """Fractions of the run at which the ``n`` growths happen.

            >>> Recipe().growth_points(3), Recipe(schedule="geometric", deadline=0.7).growth_points(2)
            ([0.2, 0.4, 0.6], [0.0875, 0.7])
            >>> Recipe(schedule="at", deadline=0.1).growth_points(3)
            [0.1, 0.1, 0.1]
        """
        if self.width is not None:
            return []
        if self.schedule == "at":
            return [self.deadline] * n
        if self.schedule == "even":
            return [round(self.deadline * (k + 1) / n, 6) for k in range(n)]
        return [round(self.deadline * 0.125 ** (n - 1 - k), 6) for k in range(n)]


RECIPES = {  # names without commas: --recipes takes a comma-separated list
    "scratch": Recipe(width=-1),
    "scratch on 0.55x steps": Recipe(width=-1, steps=0.55),
    "half width": Recipe(width=-2),
    "even 0.6 (default)": Recipe(),
    "even 0.6 + optimizer reset": Recipe(reset=True),
    "even 0.6 + shrink-perturb 0.5/0.01": Recipe(shrink_perturb=(0.5, 0.01)),
    "geometric 0.7": Recipe(schedule="geometric", deadline=0.7),
    "geometric 0.7 + LR held until the last growth": Recipe(schedule="geometric", deadline=0.7, hold=True),
    "geometric 0.7 + LR cycle per size": Recipe(schedule="geometric", deadline=0.7, cycle=True),
    "even 0.6 + LR cycle per size": Recipe(cycle=True),
    "geometric 0.7 + shrink-perturb 0.5/0.01": Recipe(schedule="geometric", deadline=0.7, shrink_perturb=(0.5, 0.01)),
    "geometric 0.7 + shrink-perturb 0.3/0.01": Recipe(schedule="geometric", deadline=0.7, shrink_perturb=(0.3, 0.01)),
    "geometric 0.7 + shrink-perturb 0.7/0.01": Recipe(schedule="geometric", deadline=0.7, shrink_perturb=(0.7, 0.01)),
    "geometric 0.7 + shrink-perturb 0.5/0.03": Recipe(schedule="geometric", deadline=0.7, shrink_perturb=(0.5, 0.03)),
    "geometric 0.7 + shrink-perturb 0.5/0.01 + optimizer reset": Recipe(
        schedule="geometric", deadline=0.7, shrink_perturb=(0.5, 0.01), reset=True),
    "even 0.6 + shrink-perturb 0.3/0.01": Recipe(shrink_perturb=(0.3, 0.01)),
    "even 0.6 + copies + shrink-perturb 0.5/0.01": Recipe(init="net2wider", shrink_perturb=(0.5, 0.01)),
    "geometric 0.7 + copies + shrink-perturb 0.5/0.01": Recipe(schedule="geometric", deadline=0.7, init="net2wider",
                                                              shrink_perturb=(0.5, 0.01)),
    "geometric 0.7 + shrink-perturb 0.2/0.01 at the last growth": Recipe(
        schedule="geometric", deadline=0.7, shrink_perturb=(0.2, 0.01), last_only=True),
    # Probes of where the gap comes from: one jump early (at 0%: before any training, a control of the surgery and
    # the fresh units; at 1%: after 1% of the run spent small), or a late jump from half width.
    "one jump at 0%": Recipe(schedule="at", deadline=0.0),
    "one jump at 1%": Recipe(schedule="at", deadline=0.01),
    "one jump at 10%": Recipe(schedule="at", deadline=0.1),
    "half width then one jump at 70%": Recipe(start=-2, deadline=0.7),
    "half width then one jump at 70% + shrink-perturb 0.5/0.01": Recipe(start=-2, deadline=0.7,
                                                                       shrink_perturb=(0.5, 0.01)),
    # New units with random outgoing weights too (the random-padding baseline: not exact): what an exact masked
    # ramp of the hidden units (MSG) could buy at most, if their zero outgoing weights slow the fresh units down.
    "even 0.6 random": Recipe(init="random"),
    "geometric 0.7 random": Recipe(schedule="geometric", deadline=0.7, init="random"),
    "one jump at 1% random": Recipe(schedule="at", deadline=0.01, init="random"),
    "one jump at 10% random": Recipe(schedule="at", deadline=0.1, init="random"),
    # The exact version: random outgoing weights that the readers fade in over 5% of the run (init="fade").
    "even 0.6 fade": Recipe(init="fade"),
    "geometric 0.7 fade": Recipe(schedule="geometric", deadline=0.7, init="fade"),
    "one jump at 10% fade": Recipe(schedule="at", deadline=0.1, init="fade"),
    # Why the small phase costs the MLP: units that die after a growth (fresh ones, whose zero Adam moments under a
    # carried step count take oversized first steps), or logits made confident by the small phase, which leave the
    # grown net little to learn from the examples it already gets right? Cooling them keeps the predictions.
    "scratch on 0.9x steps": Recipe(width=-1, steps=0.9),
    "one jump at 10% + Adam state at the old units' mean": Recipe(schedule="at", deadline=0.1, new_state="mean"),
    "one jump at 10% + logits cooled x0.1": Recipe(schedule="at", deadline=0.1, cool=0.1),
    "one jump at 10% + logits cooled x0.3": Recipe(schedule="at", deadline=0.1, cool=0.3),
    "even 0.6 + logits cooled x0.1": Recipe(cool=0.1),
    "geometric 0.7 + logits cooled x0.1": Recipe(schedule="geometric", deadline=0.7, cool=0.1),
}


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy, in eval mode and in chunks.

        >>> accuracy(nn.Identity(), torch.eye(4), torch.tensor([0, 1, 2, 0]))
        0.75
    """
    with torch.no_grad(), eval_mode(net):
        hits = sum(int((net(x[i:i + 2000]).argmax(1) == y[i:i + 2000]).sum()) for i in range(0, len(x), 2000))
    return hits / len(x)


def grow(net: nn.Module, m: Model, r: Recipe, opt: torch.optim.Optimizer, x: torch.Tensor, seed: int, step: int,
         last: bool, ramp_steps: int | None = None) -> list[autogrow.Growth]:
    """Double every target layer as the callback does (``init="auto"``: fresh units here); then the recipe's
    cooling and shrink-and-perturb."""
    growths = [autogrow.widen(net, t, 2 * getattr(net, t).weight.shape[0], init=r.init, split=0.5, optimizer=opt,
                              example_inputs=x[:8], generator=seed * 7919 + step, ramp_steps=ramp_steps,
                              new_state=r.new_state)
               for t in m.targets]
    if r.cool is not None:
        with torch.no_grad():
            for p in getattr(net, m.head).parameters():
                p.mul_(r.cool)
    if r.shrink_perturb is not None and (last or not r.last_only):
        shrink_perturb(net, *r.shrink_perturb, torch.Generator().manual_seed(seed * 104729 + step))
    return growths


def train(m: Model, r: Recipe, data: Sequence[torch.Tensor], epochs: int, seed: int, bs: int) -> dict[str, float]:
    """One run; returns test/val/train accuracy and training FLOPs (absolute)."""
    x, y, xv, yv, xt, yt = data
    width = r.start if r.width is None else r.width  # None: the model's start; -1/-2: the final width, or half
    start = {None: m.start, -1: m.final, -2: m.final // 2}.get(width, width)
    torch.manual_seed(seed)  # the suites' seed_everything: the same initial weights as theirs
    net = m.build(start)
    opt = torch.optim.Adam(net.parameters(), lr=m.lr)
    per_epoch = math.ceil(len(x) / bs)
    total = max(1, round(r.steps * epochs * per_epoch))
    events = [round(f * total) for f in r.growth_points(round(math.log2(m.final / start)))]
    points = list(events)
    shuffle, flops, step = torch.Generator().manual_seed(seed + 1000), 0.0, 0
    step_flops = 3 * forward_flops(net, x[:1]) * bs
    while step < total:
        order = torch.randperm(len(x), generator=shuffle)
        for idx in order.split(bs):
            if step == total:
                break
            while events and step == events[0]:
                events.pop(0)
                grow(net, m, r, opt, x, seed, step, last=not events, ramp_steps=max(1, round(0.05 * total)))
                if r.reset:
                    opt = torch.optim.Adam(net.parameters(), lr=m.lr)
                step_flops = 3 * forward_flops(net, x[:1]) * bs
            advance_ramps(net, step)  # init="fade": the readers fade the new units in (as AutoGrow does)
            for group in opt.param_groups:
                group["lr"] = m.lr * multiplier(r, step, total, points)
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            flops += step_flops * len(idx) / bs
            step += 1
    return {"test": accuracy(net, xt, yt), "val": accuracy(net, xv, yv), "train": accuracy(net, x[:20000], y[:20000]),
            "flops": flops, "dead": dead_units(net, x[:4096])}


def dead_units(net: nn.Module, x: torch.Tensor) -> float:
    """The fraction of units (channels) after the ``nn.ReLU`` modules that are never positive on ``x``.

        >>> net = nn.Sequential(nn.Linear(1, 2), nn.ReLU())
        >>> with torch.no_grad(): _ = net[0].weight.copy_(torch.tensor([[1.0], [-1.0]])), net[0].bias.zero_()
        >>> dead_units(net, torch.ones(3, 1))
        0.5
    """
    alive: dict[nn.Module, torch.Tensor] = {}

    def record(mod: nn.Module, _inputs: object, out: torch.Tensor) -> None:
        now = (out > 0).transpose(0, 1).flatten(1).any(1)  # per unit (channel): positive anywhere in the chunk
        alive[mod] = alive[mod] | now if mod in alive else now

    hooks = [mod.register_forward_hook(record) for mod in net.modules() if isinstance(mod, nn.ReLU)]
    try:
        accuracy(net, x, torch.zeros(len(x), dtype=torch.long))  # the forward passes, in chunks
    finally:
        for h in hooks:
            h.remove()
    return sum(int((~a).sum()) for a in alive.values()) / max(1, sum(a.numel() for a in alive.values()))


def multiplier(r: Recipe, step: int, total: int, points: Sequence[int]) -> float:
    """The LR multiplier at ``step`` of ``total``, the growths at ``points``.

        >>> [multiplier(Recipe(), t, 10, [7]) for t in (5, 6, 7, 9)], multiplier(Recipe(hold=True), 6, 10, [7])
        ([1.0, 1.0, 1.0, 0.3333333333333333], 1.0)
        >>> [round(multiplier(Recipe(cycle=True, decay=0.5), t, 10, [4]), 2) for t in (2, 3, 4, 7, 9)]
        [1.0, 0.5, 1.0, 1.0, 0.33]
    """
    done = [p for p in points if p <= step]
    a, b = (done[-1] if done else 0, next((p for p in points if p > step), total)) if r.cycle else (0, total)
    start = max(a + (1 - r.decay) * (b - a), done[-1] if done else 0, points[-1] if r.hold and points else 0)
    return 1.0 if step < start else (b - step) / (b - start)


def _arrays(m: Model, args: argparse.Namespace, seed: int) -> list[torch.Tensor]:
    dm = fashion(args, m.flatten, seed)
    return [t for load in (dm.train_dataloader, dm.val_dataloader, dm.test_dataloader) for t in load().dataset.tensors]


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    ap = parser(__doc__, epochs=10, seeds=3)
    ap.add_argument("--model", choices=sorted(MODELS), default="mlp")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names from RECIPES")
    ap.add_argument("--name", default=None, help="results file name (default screen_<model>_<epochs>ep)")
    args = ap.parse_args(argv)
    m = MODELS[args.model]
    if args.train_subset is None:
        args.train_subset = m.train_subset
    names = [n.strip() for n in args.recipes.split(",")]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        ap.error(f"--recipes: {unknown} are not in {list(RECIPES)}")
    out = finish_args(args, "screen")
    torch.set_num_threads(1)
    bs = 32 if args.quick else 128
    rows, full = [], forward_flops(m.build(m.final), torch.zeros(1, *((784,) if m.flatten else (1, 28, 28))))
    for seed in range(args.seeds):
        data = _arrays(m, args, seed)
        for name in names:
            t0 = time.perf_counter()
            res = train(m, RECIPES[name], data, args.epochs, seed, bs)
            res["flops"] /= 3 * full * len(data[0]) * args.epochs
            rows.append({"recipe": name, "seed": seed, **res, "wall_s": time.perf_counter() - t0})
            print(rows[-1], flush=True)
    write(out, args.name or f"screen_{args.model}_{args.epochs}ep", rows, _report(m, args, names, rows))
    return rows


def _report(m: Model, args: argparse.Namespace, names: Sequence[str], rows: Sequence[dict]) -> str:
    def ms(name: str, key: str) -> str:
        return mean_std([100 * r[key] for r in rows if r["recipe"] == name], ".2f")

    summary = [{"recipe": n, "test": ms(n, "test"), "val": ms(n, "val"), "train": ms(n, "train"),
                "dead": ms(n, "dead"),
                "flops": statistics.mean(r["flops"] for r in rows if r["recipe"] == n)} for n in names]
    chosen = f" --recipes '{','.join(names)}'" if list(names) != list(RECIPES) else ""
    named = f" --name {args.name}" if args.name else ""
    subset = f" ({args.train_subset} training images)" if getattr(args, "train_subset", None) else ""
    head = (f"### Screen: {m.name} {m.start} -> {m.final}, Fashion-MNIST{subset}, {args.epochs} epochs, "
            f"{args.seeds} seeds, peak LR {m.lr:g}, plain PyTorch\n\n`python -m autogrow.experiments.screen "
            f"--model {args.model} --epochs {args.epochs} --seeds {args.seeds}{chosen}{named}`. Train accuracy on "
            f"(up to) 20k training images, dead units (never active) on 4096; FLOPs over the {m.final}-wide net's for "
            f"{args.epochs} epochs.\n")
    return head + "\n" + table(summary, [("recipe", "recipe", "s"), ("test acc %", "test", "s"),
                                         ("val acc %", "val", "s"), ("train acc %", "train", "s"),
                                         ("dead ReLU units %", "dead", "s"), ("FLOPs / scratch", "flops", ".3f")])


if __name__ == "__main__":
    main()
