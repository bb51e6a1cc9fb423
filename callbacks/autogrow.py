"""``AutoGrow``: a Lightning callback that grows the model when validation plateaus, inside one fit.

A thin layer over the framework-free core: the trigger decides on ``on_validation_end`` (never in
the sanity check); the growth happens on the next ``on_train_epoch_end`` (or ``on_train_batch_start``
at a gradient-accumulation boundary, after a mid-epoch validation), never inside validation, whose
train/eval bookkeeping by module name would leave new modules in eval mode. After surgery the
optimizers and schedulers are rebuilt through the strategy (``configure_optimizers`` runs again)
and the old state is translated onto them by parameter name, so what is in memory is exactly what a
checkpoint resume rebuilds. Under DDP the decision and seeds come from rank 0 and the DDP wrapper is
rebuilt (its gradient hooks only know the old parameters).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn as nn
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException

import autogrow
from autogrow.checkpoint import CHECKPOINT_KEY, history_of, restore_history, set_history
from autogrow.plateau import DynamicNodeCreation, EveryN, Plateau, Trigger
from autogrow.policy import POLICIES, Candidate, GradientScore, GrowthPolicy
from autogrow.registry import layer_spec

TRIGGERS = ("plateau", "dnc", "every")
GROW = ("widen", "deepen")
INITS = ("exact", "random")


def _bad(name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"{name}: {value!r} is not allowed; expected {allowed}")


class AutoGrow(Callback):
    """Grow the model when a validation metric stops improving, carrying optimizer and schedule.

    Args:
        monitor: metric logged in validation (``self.log("val_loss", ...)``).
        mode: ``"min"`` or ``"max"``.
        targets: module names (relative to the LightningModule) that may grow; ``None``: every layer
            that can be widened (deepened) exactly, found by tracing.
        grow: ``"widen"`` (Net2WiderNet) or ``"deepen"`` (Net2DeeperNet after a target).
        factor: widen to ``ceil(width * factor)`` units ...
        units: ... or by this many units (takes precedence over ``factor``).
        trigger: ``"plateau"`` (patience/min_delta), ``"dnc"`` (Ash's window rule) or ``"every"``
            (a fixed schedule, for ablations).
        patience, min_delta, relative_delta: the plateau rule.
        window, threshold: the dynamic-node-creation rule.
        every: the fixed schedule, in evaluations.
        warmup: evaluations before the first growth; cooldown: evaluations after each growth.
        policy: which candidates grow at an event: ``"all"``, ``"round_robin"``, ``"smallest"``,
            ``"gradient"`` (largest mean per-unit gradient norm since the last event) or a
            :class:`~autogrow.policy.GrowthPolicy`.
        init: ``"exact"`` (function-preserving) or ``"random"`` (the baselines).
        split, noise: symmetry breaking for widening (see :func:`autogrow.plan_widen`). The default
            uneven split (0.5) is exact and makes copies diverge; with ``split=0`` exact copies get
            identical gradients and stay copies, so the wider network never uses its new units.
        residual: deepen with an ``x + f(x)`` block; ``None``: only where the activation needs it.
        batch_norm: add an (eval-mode identity) BatchNorm to deepened blocks.
        optimizer_state: ``"carry"`` the optimizer state across growth, or ``"reset"`` it (ablation).
        max_params, max_width, max_events: growth budget; growth stops when nothing fits.
        stop_patience: stop growing when the monitored metric has not beaten its pre-growth best
            within this many evaluations after a growth (Ash's validation stop); ``None``: never.
        rollback: with ``stop_patience``, also restore the weights, optimizer and schedule from just
            before that last growth (in memory only; not across a resume).
        seed: base seed of all growth randomness (mappings, splits, new weights).

    Example::

        trainer = pl.Trainer(callbacks=[AutoGrow(monitor="val_loss", patience=2, factor=2.0)])
        trainer.fit(model, datamodule=dm)
    """

    def __init__(self, monitor: str = "val_loss", mode: str = "min", targets: list[str] | None = None,
                 grow: str = "widen", factor: float = 2.0, units: int | None = None, trigger: str = "plateau",
                 patience: int = 3, min_delta: float = 0.0, relative_delta: bool = False, window: int = 3,
                 threshold: float = 0.05, every: int = 1, warmup: int = 0, cooldown: int = 0,
                 policy: str | GrowthPolicy = "all", init: str = "exact", split: float = 0.5, noise: float = 0.0,
                 residual: bool | None = None, batch_norm: bool = False, optimizer_state: str = "carry",
                 max_params: int | None = None, max_width: int | None = None, max_events: int | None = None,
                 stop_patience: int | None = None, rollback: bool = False, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(monitor, str) or not monitor:
            raise _bad("monitor", monitor, "a metric name")
        if targets is not None and (not targets or not all(isinstance(t, str) for t in targets)):
            raise _bad("targets", targets, "a non-empty list of module names, or None")
        if grow not in GROW:
            raise _bad("grow", grow, f"one of {GROW}")
        if not (isinstance(factor, (int, float)) and factor > 1):
            raise _bad("factor", factor, "a number > 1")
        if units is not None and not (isinstance(units, int) and units >= 1):
            raise _bad("units", units, "an int >= 1 or None")
        if trigger not in TRIGGERS:
            raise _bad("trigger", trigger, f"one of {TRIGGERS}")
        if isinstance(policy, str) and policy not in POLICIES:
            raise _bad("policy", policy, f"one of {tuple(POLICIES)} or a GrowthPolicy")
        if not isinstance(policy, (str, GrowthPolicy)):
            raise _bad("policy", policy, f"one of {tuple(POLICIES)} or a GrowthPolicy")
        if init not in INITS:
            raise _bad("init", init, f"one of {INITS}")
        if optimizer_state not in autogrow.optim.STATES:
            raise _bad("optimizer_state", optimizer_state, f"one of {autogrow.optim.STATES}")
        if not 0 <= split < 1:
            raise _bad("split", split, "a float in [0, 1)")
        if noise < 0:
            raise _bad("noise", noise, "a float >= 0")
        for name, v in (("max_params", max_params), ("max_width", max_width), ("max_events", max_events),
                        ("stop_patience", stop_patience)):
            if v is not None and not (isinstance(v, int) and v >= 1):
                raise _bad(name, v, "an int >= 1 or None")
        if rollback and stop_patience is None:
            raise _bad("rollback", rollback, "False unless stop_patience is set")
        if not isinstance(seed, int):
            raise _bad("seed", seed, "an int")
        # The trigger validates its own numbers (patience, window, ...), naming the argument.
        kw = {"mode": mode, "warmup": warmup, "cooldown": cooldown}
        self.trigger: Trigger = {
            "plateau": lambda: Plateau(**kw, patience=patience, min_delta=min_delta, relative=relative_delta),
            "dnc": lambda: DynamicNodeCreation(**kw, window=window, threshold=threshold),
            "every": lambda: EveryN(**kw, every=every),
        }[trigger]()
        self.monitor, self.mode, self.grow, self.factor, self.units = monitor, mode, grow, float(factor), units
        self.policy: GrowthPolicy = POLICIES[policy]() if isinstance(policy, str) else policy
        self.init, self.split, self.noise, self.residual, self.batch_norm = init, split, noise, residual, batch_norm
        self.optimizer_state = optimizer_state
        self.max_params, self.max_width, self.max_events = max_params, max_width, max_events
        self.stop_patience, self.rollback, self.seed = stop_patience, rollback, seed
        self._configured_targets = list(targets) if targets is not None else None
        # state (saved in checkpoints)
        self.targets: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.pending = False
        self.stopped: str | None = None  # why growth stopped, once it has
        self.best: float | None = None  # best monitored value seen
        self._since_growth: int | None = None  # evaluations since the last growth without beating `best`
        self._best_at_growth: float | None = None
        # in memory only
        self._probe: torch.Tensor | None = None
        self._snapshot: dict[str, Any] | None = None
        self._rollback_pending = False
        self._grad_sums: dict[str, list[float]] = {}

    @property
    def state_key(self) -> str:
        # Several AutoGrow callbacks (say, one widening and one deepening) each keep their own state.
        return self._generate_state_key(monitor=self.monitor, grow=self.grow, targets=self._configured_targets)

    # -- set-up: refuse what is not supported before training starts ----------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or (
                isinstance(strategy, DDPStrategy) and getattr(strategy, "_start_method", "popen") != "popen"):
            raise MisconfigurationException(
                f"AutoGrow: strategy {type(strategy).__name__} is not supported; use a single device or "
                "strategy='ddp' (sharded strategies such as FSDP/DeepSpeed and spawn-based DDP cannot "
                "follow a model that changes shape)")
        if not pl_module.automatic_optimization:
            raise MisconfigurationException("AutoGrow: manual optimization is not supported (the callback "
                                            "rebuilds the optimizer through configure_optimizers)")
        if not self.targets:
            self.targets = self._discover(pl_module)
        self._wrap_load_hook(pl_module)

    def _discover(self, pl_module: pl.LightningModule) -> list[str]:
        explicit = self._configured_targets
        names = explicit or [n for n, m in pl_module.named_modules() if layer_spec(m) is not None]
        found = []
        for name in names:
            try:
                self._plan(pl_module, name, seed=0)
            except autogrow.AutogrowError as e:
                if explicit:
                    raise MisconfigurationException(f"AutoGrow: targets: {name!r} cannot {self.grow}: {e}") from e
            else:
                found.append(name)
        if not found:
            raise MisconfigurationException(f"AutoGrow: no layer of {type(pl_module).__name__} can {self.grow} "
                                            "exactly; pass targets=[...] to see why for a given layer")
        return found

    def _wrap_load_hook(self, pl_module: pl.LightningModule) -> None:
        # On resume, Lightning loads the weights right after the module's on_load_checkpoint and long
        # before any callback hook: the history must be replayed there, on the freshly built model.
        original = pl_module.on_load_checkpoint
        if getattr(original, "_autogrow", False):
            return

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            restore_history(pl_module, checkpoint.get(CHECKPOINT_KEY, {}).get("history", []))
            original(checkpoint)

        on_load_checkpoint._autogrow = True  # type: ignore[attr-defined]
        pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # The wrapper is a closure (not picklable): only needed while fit may resume.
        if getattr(pl_module.__dict__.get("on_load_checkpoint"), "_autogrow", False):
            del pl_module.on_load_checkpoint

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise MisconfigurationException(f"AutoGrow: expects exactly one optimizer, configure_optimizers "
                                            f"returned {len(trainer.optimizers)}")

    # -- deciding -------------------------------------------------------------------------------
    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and isinstance(batch, (tuple, list)) and \
                isinstance(batch[0], torch.Tensor):
            self._probe = batch[0][:256].detach()  # measures function preservation at each growth

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if self.monitor not in trainer.callback_metrics:
            raise RuntimeError(f"AutoGrow: monitor={self.monitor!r} was not logged in validation; available: "
                               f"{sorted(trainer.callback_metrics)}")
        value = float(trainer.callback_metrics[self.monitor])
        value = float(trainer.strategy.broadcast(value, src=0))
        if not math.isfinite(value):
            rank_zero_warn(f"AutoGrow: {self.monitor} = {value}; no growth decision on a non-finite metric")
            return
        improved = self.best is None or self.trigger.better(value, self.best)
        self.best = value if improved else self.best
        self._check_payoff(value)
        grow = self.trigger.update(value) and self.stopped is None
        self.pending = self.pending or bool(trainer.strategy.broadcast(grow, src=0))

    def _check_payoff(self, value: float) -> None:
        """Ash's stop: a growth that does not beat the pre-growth best within stop_patience ends growth."""
        if self._since_growth is None or self.stop_patience is None:
            return
        # Exact surgery moves the metric by float round-off: that is no improvement.
        delta = max(getattr(self.trigger, "min_delta", 0.0), 1e-6 * abs(self._best_at_growth or 0.0))
        if self._best_at_growth is None or self.trigger.better(value, self._best_at_growth, delta):
            self._since_growth = None  # it paid off
            return
        self._since_growth += 1
        if self._since_growth >= self.stop_patience:
            self._since_growth = None
            self.stopped = (f"{self.monitor} did not improve on {self._best_at_growth:.4g} within "
                            f"{self.stop_patience} evaluations after the last growth")
            self._rollback_pending = self.rollback and self._snapshot is not None
            rank_zero_info(f"AutoGrow: growth stopped: {self.stopped}" +
                           ("; rolling back to the pre-growth model" if self._rollback_pending else ""))

    # -- growing ---------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # After a mid-epoch validation: grow at an accumulation boundary (no pending gradients).
        if (self.pending or self._rollback_pending) and batch_idx % trainer.accumulate_grad_batches == 0:
            self._act(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(self.policy, GradientScore):
            return
        for name in self.targets:
            w = pl_module.get_submodule(name).weight
            if w.grad is not None:
                dim = layer_spec(pl_module.get_submodule(name)).out_params["weight"]
                per_unit = w.grad.detach().float().movedim(dim, 0).flatten(1).norm(dim=1)
                acc = self._grad_sums.setdefault(name, [0.0, 0])
                acc[0] += float(per_unit.mean())
                acc[1] += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pending or self._rollback_pending:
            self._act(trainer, pl_module)
        pl_module.log("autogrow/params", float(autogrow.num_params(pl_module)), prog_bar=True, rank_zero_only=True)

    def _act(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._rollback_pending:
            self._rollback_pending = self.pending = False
            self._restore_snapshot(trainer, pl_module)
        elif self.pending:
            self.pending = False
            self._grow(trainer, pl_module)

    def _width(self, module: nn.Module) -> int:
        spec = layer_spec(module)
        return getattr(module, spec.out_attr) if spec is not None else 0

    def _new_width(self, old: int) -> int:
        new = old + self.units if self.units is not None else math.ceil(old * self.factor)
        return min(new, self.max_width) if self.max_width is not None else new

    def _plan(self, pl_module: nn.Module, name: str, seed: int) -> Any:
        exact = self.init == "exact"
        if self.grow == "widen":
            old = self._width(pl_module.get_submodule(name))
            return autogrow.plan_widen(pl_module, name, max(self._new_width(old), old + 1),
                                       init="net2wider" if exact else "random", split=self.split,
                                       noise=self.noise, generator=seed)
        kw = {"init": "identity" if exact else "random", "batch_norm": self.batch_norm, "generator": seed}
        if self.residual is not None:
            return autogrow.plan_deepen(pl_module, name, residual=self.residual, **kw)
        try:
            return autogrow.plan_deepen(pl_module, name, **kw)
        except autogrow.AutogrowError as e:
            if "not idempotent" not in str(e):
                raise
            return autogrow.plan_deepen(pl_module, name, residual=True, **kw)

    def _candidates(self, pl_module: nn.Module) -> list[Candidate]:
        out = []
        for name in self.targets:
            width = self._width(pl_module.get_submodule(name))
            if self.grow == "widen" and self._new_width(width) <= width:
                continue  # at max_width
            acc = self._grad_sums.get(name)
            out.append(Candidate(name, width, acc[0] / acc[1] if acc and acc[1] else None))
        return out

    def _grow(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.max_events is not None and len(self.events) >= self.max_events:
            self.stopped = f"max_events={self.max_events} reached"
            return
        chosen = self.policy.choose(self._candidates(pl_module))
        seed = int(trainer.strategy.broadcast(self.seed + 7919 * (len(history_of(pl_module)) + 1), src=0))
        n_before = autogrow.num_params(pl_module)
        optimizer = trainer.optimizers[0]
        old_state, old_names = optimizer.state_dict(), autogrow.param_names(optimizer, pl_module)
        sched_states = [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs]
        snapshot = self._take_snapshot(trainer, pl_module, old_state, old_names) if self.rollback else None
        before = self._forward_probe(pl_module)
        growths, changes, budget = [], [], n_before
        for i, name in enumerate(chosen):
            try:
                plan = self._plan(pl_module, name, seed + i)
            except autogrow.AutogrowError as e:  # refused before anything changed: skip this layer
                rank_zero_warn(f"AutoGrow: skipping {name!r}: {e}")
                continue
            delta = plan.param_delta
            if self.max_params is not None and budget + delta > self.max_params:
                continue
            width = self._width(pl_module.get_submodule(name))
            growth = plan.apply()
            budget += delta
            growths.append(growth)
            new_name = self._renamed(name, growth)
            changes.append({"target": name, "from": width, "to": self._width(pl_module.get_submodule(new_name)),
                            "summary": growth.summary()})
            self.targets = [self._renamed(t, growth) for t in self.targets]
        if not growths:
            self.stopped = "no layer can grow within max_params / max_width"
            rank_zero_info(f"AutoGrow: growth stopped: {self.stopped}")
            return
        self._rebuild(trainer, pl_module, old_state, old_names, growths, sched_states, self.optimizer_state)
        after = self._forward_probe(pl_module)
        set_history(pl_module, history_of(pl_module) + [g.to_dict() for g in growths])
        for cb in trainer.early_stopping_callbacks:  # growth is progress: do not stop right after it
            cb.wait_count = 0
        self.trigger.notify_growth()
        self._grad_sums.clear()
        self._snapshot = snapshot
        self._since_growth, self._best_at_growth = 0, self.best
        error = None if before is None or after is None else float((after - before).abs().max())
        self._record_event(trainer, pl_module, type(self.trigger).__name__, changes, n_before, error)

    def _record_event(self, trainer: pl.Trainer, pl_module: pl.LightningModule, trigger: str,
                      changes: list[dict[str, Any]], n_before: int, error: float | None) -> None:
        event = {"event": len(self.events) + 1, "epoch": trainer.current_epoch, "step": trainer.global_step,
                 "monitor": self.monitor, "value": self.best, "trigger": trigger, "changes": changes,
                 "params_before": n_before, "params_after": autogrow.num_params(pl_module),
                 "preservation_error": error}
        self.events.append(event)
        self._log_event(trainer, pl_module, event)

    @staticmethod
    def _renamed(name: str, growth: autogrow.Growth) -> str:
        new = growth.renames.get(f"{name}.weight")
        return new.rsplit(".", 1)[0] if new else name

    def _rebuild(self, trainer: pl.Trainer, pl_module: pl.LightningModule, old_state: dict, old_names: list[str],
                 growths: list[autogrow.Growth], sched_states: list[dict[str, Any]], state: str) -> None:
        """Rebuild DDP, optimizer and schedulers for the changed model, and load their state into them."""
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy):
            strategy.model = strategy.lightning_module
            strategy.configure_ddp()
        strategy.setup_optimizers(trainer)  # runs configure_optimizers on the new parameters
        autogrow.translate_state_dict(old_state, old_names, growths, strategy.optimizers[0], pl_module, state=state)
        new_scheds = [c.scheduler for c in strategy.lr_scheduler_configs]
        if len(new_scheds) != len(sched_states):
            raise RuntimeError(f"AutoGrow: configure_optimizers returned {len(new_scheds)} schedulers after growth, "
                               f"{len(sched_states)} before")
        for new, st in zip(new_scheds, sched_states):  # what autogrow.carry_scheduler does, from a saved state
            new.load_state_dict(st)

    def _forward_probe(self, pl_module: pl.LightningModule) -> torch.Tensor | None:
        """The model's output on a validation batch, in eval mode, without touching train/eval flags."""
        if self._probe is None:
            return None
        modes = {m: m.training for m in pl_module.modules()}
        try:
            pl_module.eval()
            with torch.no_grad():
                out = pl_module(self._probe)
            return out.detach().float() if isinstance(out, torch.Tensor) else None
        except Exception:  # a forward that does not take the batch's first element: no measurement
            return None
        finally:
            for m, training in modes.items():
                m.training = training

    def _take_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, opt_state: dict,
                       names: list[str]) -> dict[str, Any]:
        # Only children with parameters: metric modules keep their identity (Lightning logs them by it).
        children = {n: copy.deepcopy(c) for n, c in pl_module.named_children() if any(True for _ in c.parameters())}
        return {"children": children,
                "optimizer": copy.deepcopy(opt_state), "names": names, "history": history_of(pl_module),
                "targets": list(self.targets),
                "schedulers": [copy.deepcopy(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs]}

    def _restore_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        snap, self._snapshot = self._snapshot, None
        assert snap is not None
        n_before = autogrow.num_params(pl_module)
        for name, child in snap["children"].items():
            setattr(pl_module, name, child)
        set_history(pl_module, snap["history"])
        self.targets = snap["targets"]
        self._rebuild(trainer, pl_module, snap["optimizer"], snap["names"], [], snap["schedulers"], "carry")
        self._record_event(trainer, pl_module, "rollback", [], n_before, None)

    def _log_event(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: dict[str, Any]) -> None:
        what = "; ".join(f"{c['target']}: {c['from']} -> {c['to']}" for c in event["changes"]) or "rollback"
        err = event["preservation_error"]
        rank_zero_info(f"AutoGrow: event {event['event']} at epoch {event['epoch']}, step {event['step']} "
                       f"({self.monitor}={event['value']:.4g}): {what}; parameters {event['params_before']:,} -> "
                       f"{event['params_after']:,}" + (f"; max|f-g| on a validation batch {err:.2e}" if err is not None
                                                       else ""))
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            exp = logger.experiment
            rows = "\n".join(f"| {c['target']} | {c['from']} | {c['to']} | {c['summary']} |" for c in event["changes"])
            text = (f"**Growth event {event['event']}** at epoch {event['epoch']}, step {step}: "
                    f"{self.monitor} = {event['value']:.5g} ({event['trigger']})\n\n"
                    f"| layer | from | to | what |\n|---|---|---|---|\n{rows}\n\n"
                    f"parameters {event['params_before']:,} -> {event['params_after']:,}; preservation error "
                    f"{'n/a' if err is None else f'{err:.3e}'}")
            exp.add_text("autogrow/events", text, step)
            exp.add_scalar("autogrow/params", event["params_after"], step)
            exp.add_scalar("autogrow/event", event["event"], step)
            if err is not None:
                exp.add_scalar("autogrow/preservation_error", err, step)
            for c in event["changes"]:
                exp.add_scalar(f"autogrow/width/{c['target']}", c["to"], step)
            exp.add_scalar("autogrow/depth", sum(isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
                                                 for m in pl_module.modules()), step)

    # -- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"history": history_of(pl_module)}

    def state_dict(self) -> dict[str, Any]:
        return {"trigger": self.trigger.state_dict(), "policy": self.policy.state_dict(), "targets": self.targets,
                "events": self.events, "pending": self.pending, "stopped": self.stopped, "best": self.best,
                "since_growth": self._since_growth, "best_at_growth": self._best_at_growth}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.trigger.load_state_dict(state_dict["trigger"])
        self.policy.load_state_dict(state_dict["policy"])
        self.targets, self.events = list(state_dict["targets"]), list(state_dict["events"])
        self.pending, self.stopped, self.best = state_dict["pending"], state_dict["stopped"], state_dict["best"]
        self._since_growth, self._best_at_growth = state_dict["since_growth"], state_dict["best_at_growth"]


class GrowableMixin:
    """Mix into a LightningModule so that ``load_from_checkpoint`` rebuilds a grown model.

    ``class Model(GrowableMixin, pl.LightningModule): ...`` then ``Model.load_from_checkpoint(path)``:
    the saved growth history is replayed on the freshly built model before the weights load.
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_history(self, checkpoint.get(CHECKPOINT_KEY, {}).get("history", []))  # type: ignore[arg-type]
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
