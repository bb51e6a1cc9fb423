"""Does growth pay? A grown network against the baselines a sceptical reviewer asks for.

Per seed (the seed sets the data split, the initialisation and the batch order; same seed, same data):

* ``grown``: the small network + ``AutoGrow(max_params=<the final size>)`` with the library's defaults (plateau
  trigger with a deadline at 60% of the run, x2 per event, new units with random incoming and zero outgoing
  weights, carried optimizer state, LR held while growing and decayed over the last 40%);
* ``scratch``: the final-size network from scratch, same epochs, its own tuned LR and the same
  warmup-free hold-then-decay schedule (``Classifier(scheduler="wsd")``);
* ``scratch @ budget``: the final-size network trained for the grown run's training FLOPs;
* ``fixed h @ budget``: other fixed widths at that budget (the iso-FLOP frontier).

Each configuration picks its peak LR from ``--lrs`` by mean validation accuracy over ``--tune-seeds``
seeds, then runs ``--seeds`` seeds. FLOPs are the training FLOPs actually spent (3x the forward pass,
counted at the width of every step, growth included). ``--ablation`` reruns the grown configuration
with each ingredient of the recipe switched off (or an opt-in one switched on) in turn.

    python -m autogrow.experiments.suite_pays                    # MLP, Fashion-MNIST, 32x32 -> 256x256
    python -m autogrow.experiments.suite_pays --model cnn        # ConvNet 4 -> 16 channels
    python -m autogrow.experiments.suite_pays --model digits     # the README's main job, 8 -> 64 units
    python -m autogrow.experiments.suite_pays --model mlp --variant copies --lrs 3e-3   # paired; files *_lr0.003
    python -m autogrow.experiments.suite_pays --model mlp --variant ablation-lr-schedule-constant-lr --lrs 1e-3
    python -m autogrow.experiments.suite_pays --model mlp --frontier 0.6 --lrs 1e-3   # fixed widths at 0.6x FLOPs
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from autogrow.callbacks import AutoGrow
from autogrow.experiments.common import Run, fashion, finish_args, parser, plot, train, write
from autogrow.experiments.data import ArrayDataModule, DigitsDataModule
from autogrow.experiments.models import MLP, Classifier, ConvNet

from autogrow import num_params
from autogrow.actions import Widen
from autogrow.lr import GrowthLR
from autogrow.plateau import Deadline

__all__ = ["main"]


@dataclass(frozen=True)
class Setting:
    """One benchmark: how to build the network at a width, the widths, and how to feed it data."""

    name: str
    build: Callable[[int], torch.nn.Module]
    start: int
    final: int
    others: tuple[int, ...]
    flatten: bool
    epochs: int
    data: str = "Fashion-MNIST"


SETTINGS = {
    "mlp": Setting("MLP 784-h-h-10", lambda h: MLP(784, [h, h]), 32, 256, (64, 128, 192), True, 10),
    "cnn": Setting("ConvNet (c, c, 2c, 2c channels)", lambda c: ConvNet(c), 4, 16, (8, 12), False, 4),
    "digits": Setting("MLP 64-h-10 (the README's main job)", lambda h: MLP(64, [h]), 8, 64, (16, 32), True, 20,
                      "digits"),
}


def data(s: Setting, args: argparse.Namespace, seed: int) -> ArrayDataModule:
    """The setting's data; the seed sets the shuffle (and, for Fashion-MNIST, the train/validation split)."""
    if s.data == "digits":
        return DigitsDataModule(batch_size=64, seed=seed)
    return fashion(args, s.flatten, seed)

ABLATIONS: dict[str, dict[str, Any]] = {
    "- LR schedule (constant LR)": {"lr": None},
    "- deadline (plateau trigger only)": {"deadline": None},
    "- fresh units (net2wider copies, split 0.5)": {"grow": Widen(init="net2wider")},
    "- fresh units (net2wider copies, even split)": {"grow": Widen(init="net2wider", split=0.0)},
    "- exact init (random padding)": {"grow": Widen(init="random")},
    "fresh units as VT pairs": {"grow": Widen(init="vt")},
    "fresh units' state at the old units' mean": {"grow": Widen(new_state="mean")},
    "- carried optimizer state (reset)": {"optimizer_state": "reset"},
    "+ width-aware LR (muP-style)": {"lr": GrowthLR(width_scaling=True)},
    "- LR re-warm after growth (none)": {"lr": GrowthLR(rewarm=0)},  # the default re-warms over 5% of the run
    "+ shrink-and-perturb (0.9, 0.05)": {"shrink_perturb": (0.9, 0.05)},
}


VARIANTS: dict[str, dict[str, Any]] = {  # other recipes, measured against a finished run's baselines (--variant)
    "defaults": {},  # today's defaults, against baselines saved with older ones
    "geometric-deadline-0.7": {"deadline": Deadline(0.7, ratio=0.125)},  # small sizes passed in the first percent
    "deadline-0.7-ratio-0.5": {"deadline": Deadline(0.7, ratio=0.5)},
    "deadline-0.6-ratio-0.5": {"deadline": Deadline(0.6, ratio=0.5)},
    "deadline-0.45": {"deadline": 0.45},  # even spacing, finished earlier: the CNN wants its full size early
    "deadline-0.3": {"deadline": 0.3},
    "copies": {"grow": Widen(init="net2wider")},  # the recipe study's winner on the MLP (with --lrs 3e-3)
    "shrink-perturb": {"shrink_perturb": (0.6, 0.01)},  # Ash & Adams at each growth; picked on seed 0's val acc
    "copies+shrink-perturb": {"grow": Widen(init="net2wider"), "shrink_perturb": (0.6, 0.01)},
    "fresh-steps": {"lr": GrowthLR(fresh_steps=True)},  # Adam's bias correction per fresh unit (autogrow.fresh)
    "gradmax": {"grow": Widen(gradmax=True)},  # fresh rows along the top singular vectors of M (autogrow.gradmax)
    "gradmax+geometric": {"grow": Widen(gradmax=True), "deadline": Deadline(0.7, ratio=0.125)},
    "gradmax+geometric+fresh-steps": {"grow": Widen(gradmax=True), "deadline": Deadline(0.7, ratio=0.125),
                                      "lr": GrowthLR(fresh_steps=True)},  # the prototype's best (89.43 %, 3 seeds)
    "geometric+shrink-perturb": {"deadline": Deadline(0.7, ratio=0.125), "shrink_perturb": (0.5, 0.01)},  # 30 ep best
    "rewarm-0.05": {"lr": GrowthLR(rewarm=0.05)},  # re-warm over 5% of the run after each growth
    "rewarm-0.1": {"lr": GrowthLR(rewarm=0.1)},
    "fade": {"grow": Widen(init="fade")},  # random outgoing weights that the readers fade in over 5% of the run
    "fade+geometric": {"grow": Widen(init="fade"), "deadline": Deadline(0.7, ratio=0.125)},
    # the geometric deadline with the re-warm spelt out (a default since, after geometric-deadline-0.7 was measured)
    "geometric-deadline-0.7+rewarm-0.05": {"deadline": Deadline(0.7, ratio=0.125), "lr": GrowthLR(rewarm=0.05)},
    "gradmax+rewarm-0.05": {"grow": Widen(gradmax=True), "lr": GrowthLR(rewarm=0.05)},
    "gradmax+geometric+rewarm-0.05": {"grow": Widen(gradmax=True), "deadline": Deadline(0.7, ratio=0.125),
                                      "lr": GrowthLR(rewarm=0.05)},
    "fresh-steps+rewarm-0.05": {"lr": GrowthLR(fresh_steps=True, rewarm=0.05)},
    "shrink-perturb+rewarm-0.05": {"shrink_perturb": (0.6, 0.01), "lr": GrowthLR(rewarm=0.05)},
    "gradmax+geometric+shrink-perturb+rewarm-0.05": {
        "grow": Widen(gradmax=True), "deadline": Deadline(0.7, ratio=0.125), "shrink_perturb": (0.6, 0.01),
        "lr": GrowthLR(rewarm=0.05)},
}
# every ablation too, by a short name: its rows paired with a finished run, one process per ablation
VARIANTS.update({"ablation-" + re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-"): kw
                 for label, kw in ABLATIONS.items()})


def classifier(net: torch.nn.Module, lr: float, scheduler: str | None) -> Classifier:
    return Classifier(net, optimizer="adam", lr=lr, scheduler=scheduler)


def run_grown(s: Setting, args: argparse.Namespace, seed: int, peak_lr: float, **overrides: Any) -> Run:
    """The grown run; ``overrides`` are AutoGrow arguments (an ablation's ``lr=None`` is AutoGrow's, not the peak)."""
    pl.seed_everything(seed, verbose=False)
    grow = AutoGrow(**{"max_params": num_params(s.build(s.final)), "seed": seed, **overrides})
    module = classifier(s.build(s.start), peak_lr, None)
    return train("grown", module, data(s, args, seed), args.epochs, [grow], seed=seed)


def run_fixed(s: Setting, args: argparse.Namespace, seed: int, lr: float, width: int, flops: float | None) -> Run:
    """A fixed width from scratch: the run's epochs, or (``flops``) as many steps as that budget buys."""
    pl.seed_everything(seed, verbose=False)
    dm = data(s, args, seed)
    module = classifier(s.build(width), lr, "wsd")
    steps = -1
    if flops is not None:
        per_example = example_flops(module, dm)  # sets the data up
        per_batch = min(dm.batch_size, len(dm.train_dataloader().dataset))  # examples in a training step
        steps = max(1, round(flops / (per_example * per_batch)))
    label = f"fixed {width}" + (" @ budget" if flops is not None else "")
    return train(label, module, dm, args.epochs, seed=seed, max_steps=steps)


def example_flops(module: Classifier, dm: ArrayDataModule) -> float:
    """``module``'s training FLOPs per example of ``dm`` (3x the forward), measured on its first training batch."""
    dm.setup()
    return 3 * module.count_flops(dm.train_dataloader().dataset.tensors[0][: dm.batch_size])


def scratch_flops(s: Setting, args: argparse.Namespace) -> float:
    """The training FLOPs of the final-size net over ``args.epochs`` of the setting's data (seed 0's split)."""
    dm = data(s, args, 0)
    per_example = example_flops(classifier(s.build(s.final), 1e-3, None), dm)
    return per_example * len(dm.train_dataloader().dataset) * args.epochs


def tune(name: str, make: Callable[[int, float], Run], args: argparse.Namespace) -> float:
    """The peak LR of ``--lrs`` with the best mean validation accuracy over the tuning seeds."""
    if len(args.lrs) == 1:
        return args.lrs[0]
    scores = {lr: statistics.mean(make(1000 + s, lr).best_val_acc for s in range(args.tune_seeds)) for lr in args.lrs}
    best = max(scores, key=scores.__getitem__)
    print(f"tuned {name}: " + ", ".join(f"lr {lr:g}: val {v:.4f}" for lr, v in scores.items()) + f" -> {best:g}")
    return best


def row(config: str, seed: int, lr: float, run: Run, scratch: Run) -> dict[str, Any]:
    """One run's numbers; ``reach_*``: the FLOPs and wall time at which its validation accuracy first reached
    scratch's final one, as fractions of scratch's whole run (nan: never)."""
    hit = run.first_reaching(scratch.evals[-1]["val_acc"])
    return {"config": config, "seed": seed, "lr": lr, "test_acc": run.test_acc, "best_val_acc": run.best_val_acc,
            "train_flops": run.flops, "flops_ratio": run.flops / scratch.flops, "wall_s": run.wall,
            "params": run.params, "events": len(run.events),
            "reach_flops": hit["train_flops"] / scratch.flops if hit else math.nan,
            "reach_wall": hit["time"] / scratch.wall if hit else math.nan}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = parser(__doc__, epochs=0, seeds=5)
    ap.add_argument("--model", choices=sorted(SETTINGS), default="mlp")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    ap.add_argument("--tune-seeds", type=int, default=2)
    ap.add_argument("--ablation", action="store_true", help="also the ablation table of the grown recipe")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variant", choices=sorted(VARIANTS), default=None,
                    help="only grown runs of this recipe at --lrs[0], paired with the saved pays_<model>.json")
    ap.add_argument("--deadline-sweep", action="store_true",
                    help="only the table of the saved 'defaults' and 'deadline-*' variants against the baselines")
    ap.add_argument("--frontier", type=float, default=None, metavar="F",
                    help="only every fixed width trained for F x scratch's FLOPs at --lrs[0], against the target")
    ap.add_argument("--frontier-widths", type=int, nargs="+", default=None, metavar="W",
                    help="with --frontier: only these widths (default: the start width, the others and the final)")
    args = ap.parse_args(argv)
    s = SETTINGS[args.model]
    args.epochs = args.epochs or s.epochs
    out = finish_args(args, f"pays_{args.model}")
    if args.deadline_sweep:
        return deadline_sweep(out, args.model, s, args.epochs)
    if args.quick:
        s = Setting(s.name, s.build, 2, 8, (4,), s.flatten, args.epochs, s.data)
        args.tune_seeds, args.lrs = 1, args.lrs[:1]
    torch.set_num_threads(args.threads)
    if args.variant is not None:
        return run_variant(s, args, out)
    if args.frontier is not None:
        return frontier(s, args, out)
    lrs = {"grown": tune("grown", lambda seed, lr: run_grown(s, args, seed, lr), args),
           "scratch": tune("scratch", lambda seed, lr: run_fixed(s, args, seed, lr, s.final, None), args)}
    rows, scratches = [], {}
    for seed in range(args.seeds):
        grown = run_grown(s, args, seed, lrs["grown"])
        scratch = run_fixed(s, args, seed, lrs["scratch"], s.final, None)
        runs = {"grown": grown, "scratch": scratch,
                "scratch @ budget": run_fixed(s, args, seed, lrs["scratch"], s.final, grown.flops)}
        for h in s.others:
            runs[f"fixed {h} @ budget"] = run_fixed(s, args, seed, lrs["scratch"], h, grown.flops)
        rows += [row(k, seed, lrs["grown" if k == "grown" else "scratch"], r, scratch) for k, r in runs.items()]
        scratches[seed] = scratch
        if seed == 0:
            plot(out, f"pays_{args.model}", list(runs.values()), f"{s.name}: grown vs baselines (seed 0)")
        report(out, args, s, rows, lrs)  # after every seed: a long run stopped early still leaves its numbers
    if args.ablation:
        for label, kw in ABLATIONS.items():
            for seed in range(args.seeds):
                run = run_grown(s, args, seed, lrs["grown"], **kw)
                rows.append(row(label, seed, lrs["grown"], run, scratches[seed]))
        report(out, args, s, rows, lrs)
    return rows


def run_variant(s: Setting, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """Grown runs of ``args.variant`` at ``args.lrs[0]``, each paired with the saved run of its seed."""
    saved = {(r["config"], r["seed"]): r for r in json.loads((out / f"pays_{args.model}.json").read_text())}
    missing = [seed for seed in range(args.seeds) if ("scratch", seed) not in saved or ("grown", seed) not in saved]
    if missing:  # before any run: every grown run is paired with its seed's saved baselines
        raise SystemExit(f"--seeds {args.seeds}: pays_{args.model}.json has no grown and scratch runs of seed(s) "
                         f"{missing}; pass --seeds {min(missing)}")
    want, saved_flops = scratch_flops(s, args), saved[("scratch", 0)]["train_flops"]
    if abs(want / saved_flops - 1) > 0.01:  # other --epochs or --train-subset than the baselines': not comparable
        raise SystemExit(f"--epochs {args.epochs} / --train-subset {args.train_subset}: scratch would cost "
                         f"{want:.3g} FLOPs here, {saved_flops:.3g} in pays_{args.model}.json; pass the options it "
                         "was run with (its .md says)")
    rows = []
    for seed in range(args.seeds):
        run = run_grown(s, args, seed, args.lrs[0], **VARIANTS[args.variant])
        rows.append({"config": args.variant, "seed": seed, "lr": args.lrs[0], "test_acc": run.test_acc,
                     "flops_ratio": run.flops / saved[("scratch", seed)]["train_flops"], "wall_s": run.wall,
                     "events": [(e.epoch, e.step, str(e.reason.value)) for e in run.events],
                     "d_scratch_pp": 100 * (run.test_acc - saved[("scratch", seed)]["test_acc"]),
                     "d_default_pp": 100 * (run.test_acc - saved[("grown", seed)]["test_acc"])})
    ms = {k: _mean_sd([r[k] for r in rows])
          for k in ("test_acc", "flops_ratio", "d_scratch_pp", "d_default_pp")}
    md = (f"### Variant '{args.variant}' ({VARIANTS[args.variant]}) at peak LR {args.lrs[0]:g}: {s.name}, "
          f"{len(rows)} seeds, paired with pays_{args.model}.json\n\n"
          f"test {100 * ms['test_acc'][0]:.2f} ± {100 * ms['test_acc'][1]:.2f} %, FLOPs / scratch "
          f"{ms['flops_ratio'][0]:.3f}; paired vs scratch {ms['d_scratch_pp'][0]:+.2f} ± "
          f"{ms['d_scratch_pp'][1]:.2f} pp, "
          f"vs the default grown run {ms['d_default_pp'][0]:+.2f} ± {ms['d_default_pp'][1]:.2f} pp (± std over seeds)")
    at = "" if args.lrs[0] == saved[("grown", 0)]["lr"] else f"_lr{args.lrs[0]:g}"  # other LR: in the name
    write(out, f"pays_{args.model}_{args.variant}{at}", rows, md)
    return rows


def frontier(s: Setting, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """The iso-FLOP frontier at the target's budget: every fixed width from scratch, trained for ``args.frontier`` x
    scratch's training FLOPs (its own hold-then-decay schedule, at ``args.lrs[0]``), against the target (the saved
    scratch run's test accuracy minus 0.1 pp). Where no width reaches it, a grown run that meets the target beats them
    all at equal compute."""
    full = scratch_flops(s, args)
    saved = json.loads((out / f"pays_{args.model}.json").read_text())
    target = statistics.mean(r["test_acc"] for r in saved if r["config"] == "scratch") - 1e-3
    rows = []
    for width in args.frontier_widths or (s.start, *s.others, s.final):
        for seed in range(args.seeds):
            run = run_fixed(s, args, seed, args.lrs[0], width, args.frontier * full)
            rows.append({"config": f"fixed {width}", "seed": seed, "lr": args.lrs[0], "test_acc": run.test_acc,
                         "flops_ratio": run.flops / full, "wall_s": run.wall})
    lines = ["| fixed width | test acc % | FLOPs / scratch | seeds at the target |", "|---|---|---|---|"]
    for config in dict.fromkeys(r["config"] for r in rows):
        rs = [r for r in rows if r["config"] == config]
        (t, ts), (f, _) = _mean_sd([r["test_acc"] for r in rs]), _mean_sd([r["flops_ratio"] for r in rs])
        lines.append(f"| {config} | {100 * t:.2f} ± {100 * ts:.2f} | {f:.3f} | "
                     f"{sum(r['test_acc'] >= target for r in rs)}/{len(rs)} |")
    md = (f"### The iso-FLOP frontier at {args.frontier:g}x scratch's FLOPs: {s.name}, {s.data}, {args.epochs} "
          f"epochs' scratch\n\nEach fixed width from scratch for as many steps as {args.frontier:g}x the training "
          f"FLOPs of the {s.final}-wide net's {args.epochs} epochs buy, hold-then-decay, peak LR {args.lrs[0]:g}; the "
          f"target is pays_{args.model}.json's scratch test accuracy minus 0.1 pp: {100 * target:.2f} %. Mean ± std "
          f"over {args.seeds} seeds. `python -m autogrow.experiments.suite_pays {_frontier_options(s, args)}`.\n\n"
          + "\n".join(lines))
    write(out, f"pays_{args.model}_frontier_{args.frontier:g}", rows, md)
    return rows


def _frontier_options(s: Setting, args: argparse.Namespace) -> str:
    """The command-line options that reproduce a ``--frontier`` run, the defaults left out."""
    opts = [f"--model {args.model}", f"--frontier {args.frontier:g}", f"--lrs {args.lrs[0]:g}"]
    if args.quick:  # --quick sets the epochs, seeds and subset itself
        opts.insert(0, "--quick")
    else:
        opts.append(f"--seeds {args.seeds}")
        opts += [f"--epochs {args.epochs}"] if args.epochs != s.epochs else []
        opts += [f"--train-subset {args.train_subset}"] if args.train_subset else []
    opts += [f"--frontier-widths {' '.join(map(str, args.frontier_widths))}"] if args.frontier_widths else []
    return " ".join(opts + ([f"--out {args.out}"] if args.out else []))


SWEEP = {"deadline-0.3": 0.3, "deadline-0.45": 0.45, "defaults": 0.6}  # variants with even spacing, by deadline


def deadline_sweep(out: Path, model: str, s: Setting, epochs: int) -> list[dict[str, Any]]:
    """The saved runs of the even-spacing deadlines (``SWEEP``) next to the saved baselines trained on a budget:
    what finishing growth earlier buys, and whether any deadline gets above the fixed nets' accuracy-FLOPs curve.
    Deadline 0.6 is the ``defaults`` variant, else (a run measured with today's defaults) the saved grown run."""
    saved = json.loads((out / f"pays_{model}.json").read_text())
    runs = {v: json.loads((out / f"pays_{model}_{v}.json").read_text()) for v in SWEEP
            if (out / f"pays_{model}_{v}.json").exists()}
    runs.setdefault("defaults", [r for r in saved if r["config"] == "grown"])
    base = {r["seed"]: r["test_acc"] for r in runs["defaults"]}
    groups = [(f"grown, deadline {SWEEP[v]}", runs[v]) for v in SWEEP if v in runs]
    groups += [(c, [r for r in saved if r["config"] == c]) for c in dict.fromkeys(r["config"] for r in saved)
               if c.startswith(("scratch", "fixed"))]
    lines = ["| run | test acc % | FLOPs / scratch | paired d test vs deadline 0.6 (pp) |", "|---|---|---|---|"]
    rows = []
    for config, rs in groups:
        (t, ts), (f, _) = _mean_sd([r["test_acc"] for r in rs]), _mean_sd([r["flops_ratio"] for r in rs])
        d = [100 * (r["test_acc"] - base[r["seed"]]) for r in rs if r["seed"] in base]
        rows.append({"config": config, "test_acc": t, "flops_ratio": f, "d_pp": statistics.mean(d) if d else math.nan})
        paired = "{:+.2f} ± {:.2f}".format(*_mean_sd(d)) if len(d) > 1 and any(d) else "-"
        lines.append(f"| {config} | {100 * t:.2f} ± {100 * ts:.2f} | {f:.3f} | {paired} |")
    md = (f"### When growth finishes: {s.name}, {s.data}, {epochs} epochs, the deadline swept\n\n"
          f"`AutoGrow(max_params=..., deadline=f)` (even spacing: the k-th of n events at k/n x f of the run), the "
          f"library's defaults otherwise (f = 0.6), paired by seed (± std over seeds); the baselines are "
          f"`pays_{model}.json`'s, trained on the FLOPs of the grown run of that file.\n\n" + "\n".join(lines))
    write(out, f"pays_{model}_deadline_sweep", rows, md)
    return rows


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    """Mean and standard deviation (0 for a single value)."""
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _stats(rows: list[dict[str, Any]], config: str, key: str) -> tuple[float, float]:
    return _mean_sd([r[key] for r in rows if r["config"] == config])


def _reach(rows: list[dict[str, Any]], config: str) -> str:
    """Median FLOPs and wall-time fractions at which the runs that got there reached scratch's final val acc."""
    hits = [r for r in rows if r["config"] == config and not math.isnan(r.get("reach_flops", math.nan))]
    n = sum(r["config"] == config for r in rows)
    if not hits:
        return f"never (0/{n})"
    return (f"{statistics.median(r['reach_flops'] for r in hits):.2f}, "
            f"{statistics.median(r['reach_wall'] for r in hits):.2f} ({len(hits)}/{n})")


def _paired(rows: list[dict[str, Any]], config: str) -> str:
    """Mean per-seed test-accuracy difference (config - grown) +- its standard error, in pp."""
    grown = {r["seed"]: r["test_acc"] for r in rows if r["config"] == "grown"}
    d = [100 * (r["test_acc"] - grown[r["seed"]]) for r in rows if r["config"] == config and r["seed"] in grown]
    if len(d) < 2:
        return "n/a"
    return f"{statistics.mean(d):+.2f} ± {statistics.stdev(d) / math.sqrt(len(d)):.2f}"


def report(out: Path, args: argparse.Namespace, s: Setting, rows: list[dict[str, Any]], lrs: dict[str, float]) -> None:
    configs = list(dict.fromkeys(r["config"] for r in rows))
    lines = ["| run | test acc % | best val acc % | FLOPs / scratch | wall s | paired d test vs grown (pp) | "
             "reaches scratch's final val acc: FLOPs, wall / scratch (runs) |", "|---|---|---|---|---|---|---|"]
    for c in configs:
        (t, ts), (v, vs) = _stats(rows, c, "test_acc"), _stats(rows, c, "best_val_acc")
        f, w = _stats(rows, c, "flops_ratio")[0], _stats(rows, c, "wall_s")[0]
        lines.append(f"| {c} | {100 * t:.2f} ± {100 * ts:.2f} | {100 * v:.2f} ± {100 * vs:.2f} | {f:.3f} | {w:.0f} | "
                     f"{'-' if c == 'grown' else _paired(rows, c)} | {_reach(rows, c)} |")
    scratch = _stats(rows, "scratch", "test_acc")[0]
    grown = _stats(rows, "grown", "test_acc")[0]
    target = f"grown {100 * grown:.2f} vs scratch - 0.1 = {100 * scratch - 0.1:.2f}: " + (
        "met" if grown >= scratch - 0.001 else f"missed by {100 * (scratch - grown) - 0.1:.2f} pp")
    seeds = len({r["seed"] for r in rows})
    md = (f"### Does growth pay? {s.name}, {s.data}, {args.epochs} epochs, {seeds} seeds\n\n"
          f"Grown {s.start} -> {s.final} with `AutoGrow(max_params=...)` defaults (peak LR {lrs['grown']:g}); "
          f"from-scratch baselines with their own peak LR ({lrs['scratch']:g}) and the same hold-then-decay "
          f"schedule. " + (f"LRs chosen from {args.lrs} by validation accuracy on {args.tune_seeds} separate seeds."
                           if len(args.lrs) > 1 else "The LR was given (--lrs), not tuned in this run.") +
          f" Train subset: {args.train_subset or 'all'}.\n\n"
          f"Target (grown >= scratch - 0.1 pp): {target}.\n\n" + "\n".join(lines))
    write(out, f"pays_{args.model}", rows, md)


if __name__ == "__main__":
    main()
