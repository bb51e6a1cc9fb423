"""``AutoGrow``: a Lightning callback that grows the model when validation plateaus, inside one fit.

A thin layer over the framework-free core, composed of typed pieces: a trigger (when), a growth
action (what happens to one layer), a policy (which layers) and budgets. The trigger decides on
``on_validation_end`` (never in the sanity check); the growth happens on the next
``on_train_epoch_end`` (or ``on_train_batch_start`` at a gradient-accumulation boundary, after a
mid-epoch validation), never inside validation, whose train/eval bookkeeping by module name would
leave new modules in eval mode. After surgery the optimizers and schedulers are rebuilt through the
strategy and their state translated by parameter name (``callbacks.rebuild``). Under DDP the decision
and seeds come from rank 0 and the DDP wrapper is rebuilt.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn as nn

import autogrow
from autogrow.actions import GrowthAction, discover_targets, make_action, width_of
from autogrow.checkpoint import CHECKPOINT_KEY, history_of, set_history
from autogrow.errors import check, check_bool, check_choice, check_int
from autogrow.events import Change, GrowthEvent, Reason, StopReason
from autogrow.plan import Undo
from autogrow.plateau import PayoffCheck, Trigger, make_trigger
from autogrow.policy import Candidate, GradientTracker, GrowthPolicy, make_policy

from ._compat import CALLBACK_BASES, MisconfigurationError, check_supported, info, warn
from .mixin import unwrap_load_hook, wrap_load_hook
from .probe import Probe
from .rebuild import TrainingState, rebuild
from .report import report
from .snapshot import Skeleton, Snapshot
from .state import dump_state, load_state

__all__ = ["AutoGrow"]


class AutoGrow(*CALLBACK_BASES):  # type: ignore[misc]
    """Grow the model when a validation metric stops improving, carrying optimizer and schedule.

    Args:
        monitor: metric logged in validation (``self.log("val_loss", ...)``).
        mode: ``"min"`` or ``"max"``.
        trigger: when to grow: ``"plateau"``, ``"dnc"`` (Ash's rule), ``"every"`` (a fixed schedule) or a
            :class:`~autogrow.plateau.Trigger` such as ``Plateau(patience=3, warmup=2, cooldown=1)``.
        grow: what to do to a layer: ``"widen"``, ``"deepen"`` or an :class:`~autogrow.actions.Widen` /
            :class:`~autogrow.actions.Deepen` with its options (factor, initialiser, split, residual...).
        policy: which candidates grow at an event: ``"all"``, ``"round_robin"``, ``"smallest"``,
            ``"gradient"`` or a :class:`~autogrow.policy.GrowthPolicy`. Layers coupled through a residual
            stream form one candidate.
        targets: module names (relative to the LightningModule) that may grow; ``None``: every layer that
            can grow exactly, found by tracing.
        max_params, max_width, max_events: the growth budget; growth stops when nothing fits.
        stop_patience: stop growing when the monitored metric has not beaten its pre-growth best within
            this many evaluations after a growth (Ash's validation stop); ``None``: never.
        rollback: with ``stop_patience``, also restore the weights, optimizer and schedule from just
            before that last growth (in memory only; not across a resume).
        optimizer_state: ``"carry"`` the optimizer state across growth, or ``"reset"`` it (ablation).
        on_error: every growth is checked on a validation batch; one that fails (the grown forward raises or
            computes another function) is undone exactly, then ``"raise"`` stops the fit with an
            :class:`~autogrow.AutogrowError`, ``"skip"`` warns and trains on without that layer's growth.
        seed: base seed of all growth randomness (mappings, splits, new weights).

    Example::

        trainer = pl.Trainer(callbacks=[AutoGrow(monitor="val_loss", max_params=1_000_000)])
        trainer.fit(model, datamodule=dm)
    """

    def __init__(self, monitor: str = "val_loss", mode: str = "min", trigger: str | Trigger = "plateau",
                 grow: str | GrowthAction = "widen", policy: str | GrowthPolicy = "all",
                 targets: list[str] | None = None, max_params: int | None = None, max_width: int | None = None,
                 max_events: int | None = None, stop_patience: int | None = None, rollback: bool = False,
                 optimizer_state: str = "carry", on_error: str = "raise", seed: int = 0) -> None:
        super().__init__()
        check("monitor", monitor, isinstance(monitor, str) and bool(monitor), "a metric name")
        check("targets", targets, targets is None or (isinstance(targets, list) and bool(targets) and all(
            isinstance(t, str) for t in targets)), "a non-empty list of module names, or None")
        for name, v in (("max_params", max_params), ("max_width", max_width), ("max_events", max_events),
                        ("stop_patience", stop_patience)):
            check_int(name, v, 1, optional=True)
        check_bool("rollback", rollback)
        check("rollback", rollback, not rollback or stop_patience is not None, "False unless stop_patience is set")
        check_choice("optimizer_state", optimizer_state, autogrow.optim.STATES)
        check_choice("on_error", on_error, ("raise", "skip"))
        check_int("seed", seed, 0, 2**62)  # seeds derived per event stay below 2**63
        if ("loss" in monitor and mode == "max") or ("acc" in monitor and mode == "min"):
            warnings.warn(f"AutoGrow: mode={mode!r} for monitor={monitor!r}: is that the right direction?",
                          UserWarning, stacklevel=2)
        self.monitor, self.mode = monitor, mode
        self.trigger = make_trigger(trigger, mode)
        self.action = make_action(grow)
        self.policy = make_policy(policy)
        self.max_params, self.max_width, self.max_events = max_params, max_width, max_events
        self.stop_patience, self.rollback = stop_patience, rollback
        self.optimizer_state, self.on_error, self.seed = optimizer_state, on_error, seed
        self._configured_targets = list(targets) if targets is not None else None
        # state (saved in checkpoints)
        self.targets: list[str] = []
        self.events: list[GrowthEvent] = []
        self.pending = False
        self.stopped: StopReason | None = None
        self.stop_message = ""
        self.best: float | None = None  # best monitored value seen
        self.payoff = PayoffCheck(mode, stop_patience or 1, getattr(self.trigger, "min_delta", 0.0))
        # in memory only
        self.probe = Probe()
        self._skeleton: Skeleton | None = None  # the original architecture, for checkpoints from before growth
        self._snapshot: Snapshot | None = None
        self._rollback_pending = False
        self._gradients = GradientTracker()

    @property
    def state_key(self) -> str:
        # Several AutoGrow callbacks (say, one widening and one deepening) each keep their own state.
        return self._generate_state_key(monitor=self.monitor, grow=self.action.name, targets=self._configured_targets)

    # -- set-up: refuse what is not supported before training starts ----------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._skeleton is None and not history_of(pl_module):
            self._skeleton = Skeleton(pl_module)
        wrap_load_hook(pl_module, self._skeleton.reset if self._skeleton is not None else None)
        if stage != "fit":
            return
        check_supported(trainer, pl_module)
        if not self.targets:
            try:
                self.targets = discover_targets(pl_module, self.action, self._configured_targets)
            except autogrow.AutogrowError as e:
                raise MisconfigurationError(f"AutoGrow: {e}") from e

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        unwrap_load_hook(pl_module)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if len(trainer.optimizers) != 1:
            raise MisconfigurationError(f"AutoGrow: expects exactly one optimizer, configure_optimizers "
                                        f"returned {len(trainer.optimizers)}")
        try:
            autogrow.check_optimizer(trainer.optimizers[0], pl_module, self.optimizer_state)
        except autogrow.AutogrowError as e:
            raise MisconfigurationError(f"AutoGrow: {e}") from e

    # -- deciding ---------------------------------------------------------------------------------------
    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and dataloader_idx == 0:
            self.probe.capture(batch, validation=True)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn != "fit":
            return
        if self.monitor not in trainer.callback_metrics:
            raise RuntimeError(f"AutoGrow: monitor={self.monitor!r} was not logged in validation; available: "
                               f"{sorted(trainer.callback_metrics)}")
        if trainer.sanity_checking:
            return
        value = float(trainer.strategy.broadcast(float(trainer.callback_metrics[self.monitor]), src=0))
        if not math.isfinite(value):
            warn(trainer, f"AutoGrow: {self.monitor} = {value}; no growth decision on a non-finite metric")
            return
        if self.best is None or self.trigger.better(value, self.best):
            self.best = value
        if self.stop_patience is not None and self.payoff.update(value):
            self._stop(trainer, StopReason.NO_PAYOFF, f"{self.monitor} did not improve on "
                       f"{self.payoff.best_at_growth:.4g} within {self.stop_patience} evaluations after the growth")
            self._rollback_pending = self.rollback and self._snapshot is not None
            if self._rollback_pending:
                info(trainer, "AutoGrow: rolling back to the pre-growth model")
        grow = self.trigger.update(value) and self.stopped is None
        self.pending = self.pending or bool(trainer.strategy.broadcast(grow, src=0))

    def _stop(self, trainer: Any, reason: StopReason, message: str) -> None:
        self.stopped, self.stop_message = reason, message
        info(trainer, f"AutoGrow: growth stopped: {message}")

    # -- growing ------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.probe.inputs is None:
            self.probe.capture(batch, validation=False)
        # After a mid-epoch validation: grow at an accumulation boundary (no pending gradients).
        if (self.pending or self._rollback_pending) and batch_idx % trainer.accumulate_grad_batches == 0:
            self._act(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        if self.policy.needs_gradients:
            self._gradients.add(pl_module, self.targets)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.pending or self._rollback_pending:
            self._act(trainer, pl_module)
        pl_module.log("autogrow/params", float(autogrow.num_params(pl_module)), prog_bar=True, rank_zero_only=True)

    def _act(self, trainer: Any, pl_module: Any) -> None:
        if self._rollback_pending:
            self._rollback_pending = self.pending = False
            n_before = autogrow.num_params(pl_module)
            snapshot, self._snapshot = self._snapshot, None
            self.targets = snapshot.restore(trainer, pl_module)
            self._record(trainer, pl_module, Reason.ROLLBACK, [], n_before, None)
        elif self.pending:
            self.pending = False
            self._grow(trainer, pl_module)

    def _candidates(self, pl_module: nn.Module) -> list[Candidate]:
        out = []
        for name in self.targets:
            if not self.action.can_grow(pl_module, name, self.max_width):
                continue  # at max_width
            out.append(Candidate(name, width_of(pl_module.get_submodule(name)), self._gradients.score(name)))
        return out

    def _grow(self, trainer: Any, pl_module: Any) -> None:
        if self.max_events is not None and len([e for e in self.events if e.reason is not Reason.ROLLBACK]) \
                >= self.max_events:
            return self._stop(trainer, StopReason.MAX_EVENTS, f"max_events={self.max_events} reached")
        bad = next((n for n, p in pl_module.named_parameters() if not bool(torch.isfinite(p).all())), None)
        if bad is not None:
            return warn(trainer, f"AutoGrow: not growing: parameter {bad!r} holds NaN/inf values (training diverged)")
        chosen = self.policy.choose(self._candidates(pl_module))
        seed = int(trainer.strategy.broadcast(self.seed + 7919 * (len(history_of(pl_module)) + 1), src=0))
        n_before = autogrow.num_params(pl_module)
        saved = TrainingState.capture(trainer, pl_module)
        snapshot = Snapshot.take(trainer, pl_module, self.targets) if self.rollback else None
        before = self.probe.outputs(pl_module)
        growths, changes = self._apply_plans(trainer, pl_module, chosen, seed, n_before)
        if not growths and not self.targets:
            return self._stop(trainer, StopReason.REFUSED, "every layer's growth failed its check")
        if not growths:
            return self._stop(trainer, StopReason.BUDGET, "no layer can grow within max_params / max_width")
        rebuild(trainer, pl_module, saved, growths, self.optimizer_state)
        after = self.probe.outputs(pl_module)
        set_history(pl_module, history_of(pl_module) + [g.to_dict() for g in growths])
        for cb in trainer.early_stopping_callbacks:  # growth is progress: do not stop right after it
            cb.wait_count = 0
        self.trigger.notify_growth()
        self._gradients.clear()
        self._snapshot = snapshot
        self.payoff.grew(self.best)
        self._record(trainer, pl_module, Reason(self.trigger.reason), changes, n_before, Probe.error(before, after))

    def _apply_plans(self, trainer: Any, pl_module: Any, chosen: list[str], seed: int, n_params: int
                     ) -> tuple[list[autogrow.Growth], list[Change]]:
        growths, changes, event, targets = [], [], Undo(), list(self.targets)
        for i, name in enumerate(chosen):
            try:
                plan = self.action.plan(pl_module, name, seed + i, max_width=self.max_width,
                                        example_inputs=self.probe.inputs)
                delta = plan.param_delta
                if self.max_params is not None and n_params + delta > self.max_params:
                    continue
                width = width_of(pl_module.get_submodule(name))
                growth = plan.apply(record=event)  # checked on the probe; undone if it fails
            except autogrow.AutogrowError as e:
                if self.on_error == "raise":
                    event.restore()  # the layers grown earlier in this event too: the model is as before
                    self.targets = targets
                    raise autogrow.AutogrowError(f"AutoGrow: growing {name!r} failed and was undone: {e}") from e
                warn(trainer, f"AutoGrow: {name!r} will not grow any more: {e}")
                self.targets = [t for t in self.targets if t != name]
                continue
            n_params += delta
            growths.append(growth)
            new_name = self._renamed(name, growth)
            changes.append(Change(name, width, width_of(pl_module.get_submodule(new_name)), growth.summary()))
            self.targets = [self._renamed(t, growth) for t in self.targets]
        return growths, changes

    def _record(self, trainer: Any, pl_module: Any, reason: Reason, changes: list[Change], n_before: int,
                error: float | None) -> None:
        event = GrowthEvent(len(self.events) + 1, trainer.current_epoch, trainer.global_step, self.monitor, self.best,
                            reason, changes, n_before, autogrow.num_params(pl_module), error)
        self.events.append(event)
        report(trainer, pl_module, event)

    @staticmethod
    def _renamed(name: str, growth: autogrow.Growth) -> str:
        new = growth.renames.get(f"{name}.weight")
        return new.rsplit(".", 1)[0] if new else name

    # -- checkpoints -------------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"history": history_of(pl_module)}

    def state_dict(self) -> dict[str, Any]:
        return dump_state(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the callback's state; tolerant of checkpoints from autogrow 0.1 (no ``version``)."""
        load_state(self, state_dict)
