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

import copy
import math
import warnings
from typing import Any

import torch
import torch.nn as nn

import autogrow
from autogrow.actions import GrowthAction, discover_targets, make_action, width_of
from autogrow.budget import Budget
from autogrow.checkpoint import CHECKPOINT_KEY, history_of
from autogrow.errors import check, check_bool, check_choice, check_int
from autogrow.events import Change, GrowthEvent, Reason, StopReason
from autogrow.lr import GrowthLR
from autogrow.plateau import Deadline, PayoffCheck, Trigger, make_trigger
from autogrow.policy import Candidate, GradientTracker, GrowthPolicy, TryCandidates, make_policy
from autogrow.ramp import advance_ramps, ramp_state
from autogrow.resize import Shrink

from ._compat import CALLBACK_BASES, MisconfigurationError, check_supported, info, warn
from .gradmax import PendingGradMax
from .growth_event import grow_event
from .mixin import unwrap_load_hook, wrap_load_hook
from .probe import Probe
from .report import report
from .resizing import Resizer
from .schedule import RunSchedule
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
            ``"gradient"``, ``"try"`` (:class:`~autogrow.policy.TryCandidates`: the growth that lowers the loss
            most per added FLOP in a few trial steps) or a :class:`~autogrow.policy.GrowthPolicy`. Layers coupled
            through a residual stream form one candidate.
        targets: module names (relative to the LightningModule) that may grow; ``None``: every layer that
            can grow exactly, found by tracing.
        max_params, max_width, max_events: the growth budget; growth stops when nothing fits.
        deadline: with a size budget (``max_params`` or ``max_width``), the fraction of the run by which it is
            reached, or a :class:`~autogrow.plateau.Deadline`: growth events are spread evenly up to it when the
            metric does not plateau first (``Deadline(0.7, ratio=0.125)``: the small sizes are passed in the
            first percent of the run instead). It is checked before every training batch; a point that finds
            growth behind schedule brings as many events as it takes to catch up (``None``: grow on the trigger
            only).
        lr: the learning rate around growth (:class:`~autogrow.lr.GrowthLR`), a multiplier applied on top of
            your optimizer and scheduler: ``"wsd"`` (the default ``GrowthLR()``) holds it while growing, re-warms
            it from 0.1x over 5% of the run after each growth, and decays it linearly to zero over the last 40% of
            the run (never before the last growth); ``None``: leave the LR alone.
        shrink_perturb: ``(shrink, noise)``: after each growth every weight becomes ``shrink * w + noise * u``
            (Ash & Adams 2020; not function-preserving; opt-in).
        stop_patience: stop growing when the monitored metric has not beaten its pre-growth best within
            this many evaluations after a growth (Ash's validation stop); ``None``: never.
        rollback: with ``stop_patience``, also restore the weights, optimizer and schedule from just
            before that last growth (in memory only; not across a resume).
        optimizer_state: ``"carry"`` the optimizer state across growth, or ``"reset"`` it (ablation).
        on_error: every growth is checked on a validation batch; one that fails (the grown forward raises or
            computes another function) is undone exactly, then ``"raise"`` stops the fit with an
            :class:`~autogrow.AutogrowError`, ``"skip"`` warns and trains on without that layer's growth.
        seed: base seed of all growth randomness (mappings, splits, new weights).
        shrink: also shrink (:class:`~autogrow.resize.Shrink`): merge duplicate units, prune redundant ones within
            a tolerance, prune when over capacity; ``min_params`` there; a layer that shrank sits out the next
            growth and then waits for the metric to beat its best at the shrink. ``None``: never shrink.

    Example::

        trainer = pl.Trainer(callbacks=[AutoGrow(monitor="val_loss", max_params=1_000_000)])
        trainer.fit(model, datamodule=dm)
    """

    def __init__(self, monitor: str = "val_loss", mode: str = "min", trigger: str | Trigger = "plateau",
                 grow: str | GrowthAction = "widen", policy: str | GrowthPolicy = "all",
                 targets: list[str] | None = None, max_params: int | None = None, max_width: int | None = None,
                 max_events: int | None = None, deadline: float | Deadline | None = 0.6,
                 lr: str | GrowthLR | None = "wsd", shrink_perturb: tuple[float, float] | None = None,
                 stop_patience: int | None = None, rollback: bool = False, optimizer_state: str = "carry",
                 on_error: str = "raise", seed: int = 0, shrink: Shrink | None = None) -> None:
        super().__init__()
        check("monitor", monitor, isinstance(monitor, str) and bool(monitor), "a metric name")
        check("targets", targets, targets is None or (isinstance(targets, list) and bool(targets) and all(
            isinstance(t, str) for t in targets)), "a non-empty list of module names, or None")
        check_int("stop_patience", stop_patience, 1, optional=True)
        check_bool("rollback", rollback)
        check("rollback", rollback, not rollback or stop_patience is not None, "False unless stop_patience is set")
        check_choice("optimizer_state", optimizer_state, autogrow.optim.STATES)
        check_choice("on_error", on_error, ("raise", "skip"))
        check("lr", lr, lr is None or lr == "wsd" or isinstance(lr, GrowthLR), "'wsd', a GrowthLR or None")
        check("shrink_perturb", shrink_perturb, shrink_perturb is None or (
            len(shrink_perturb) == 2 and 0 <= shrink_perturb[0] <= 1 and shrink_perturb[1] >= 0),
              "(shrink in [0, 1], noise >= 0) or None")
        check_int("seed", seed, 0, 2**62)  # seeds derived per event stay below 2**63
        check("shrink", shrink, shrink is None or isinstance(shrink, Shrink), "a Shrink(...) or None")
        low = shrink.min_params if shrink is not None else None
        check("Shrink.min_params", low, low is None or max_params is None or low <= max_params,
              f"at most max_params={max_params}")
        if ("loss" in monitor and mode == "max") or ("acc" in monitor and mode == "min"):
            warnings.warn(f"AutoGrow: mode={mode!r} for monitor={monitor!r}: is that the right direction?",
                          UserWarning, stacklevel=2)
        self.monitor, self.mode = monitor, mode
        self.trigger = make_trigger(trigger, mode)
        self.action = make_action(grow)
        self.policy = make_policy(policy)
        self.budget = Budget(max_params, max_width, max_events)
        self.stop_patience, self.rollback = stop_patience, rollback
        self.optimizer_state, self.on_error, self.seed = optimizer_state, on_error, seed
        self.shrink_perturb = shrink_perturb
        if deadline is not None and not isinstance(deadline, Deadline):
            deadline = Deadline(deadline)  # checks the value, naming `deadline`
        self.schedule = RunSchedule(GrowthLR() if lr == "wsd" else copy.deepcopy(lr), copy.deepcopy(deadline))
        self._configured_targets = list(targets) if targets is not None else None
        tries = isinstance(self.policy, TryCandidates)
        self.resizer = Resizer(shrink, mode, max(shrink.batches if shrink else 0, min(self.policy.steps, 8) if tries
                                                 else 0))  # the training batches the decisions need
        # state (saved in checkpoints)
        self.targets: list[str] = []
        self.events: list[GrowthEvent] = []
        self.pending = False
        self._reason = Reason(self.trigger.reason)  # why the pending growth was decided
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
        self._gradmax = PendingGradMax()  # fresh rows to set at the next optimizer step

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
        self._gradmax.cancel()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if len(trainer.optimizers) != 1:
            raise MisconfigurationError(f"AutoGrow: expects exactly one optimizer, configure_optimizers "
                                        f"returned {len(trainer.optimizers)}")
        try:
            autogrow.check_optimizer(trainer.optimizers[0], pl_module, self.optimizer_state)
        except autogrow.AutogrowError as e:
            raise MisconfigurationError(f"AutoGrow: {e}") from e
        self.schedule.start(trainer, pl_module)

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
        grow = self.trigger.update(value)
        self.schedule.forget()  # what can grow may have changed with this evaluation (a shrunk layer's block)
        if not grow and self.schedule.due(trainer, self._grown(), lambda: self._events_needed(pl_module)):
            grow, self._reason = True, Reason.DEADLINE
        elif grow:
            self._reason = Reason(self.trigger.reason)
        over = self.resizer.decide(value, self.trigger.better, lambda b: bool(trainer.strategy.broadcast(b, src=0)),
                                   self.schedule.progress(trainer)) is Reason.OVERFIT  # then shrink, not grow
        grow = grow and self.stopped is None and not over
        self.pending = self.pending or bool(trainer.strategy.broadcast(grow, src=0))

    def _stop(self, trainer: Any, reason: StopReason, message: str) -> None:
        self.stopped, self.stop_message = reason, message
        info(trainer, f"AutoGrow: growth stopped: {message}")

    # -- growing ------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.probe.inputs is None:
            self.probe.capture(batch, validation=False)
        self.schedule.sync(trainer, pl_module)
        if batch_idx % trainer.accumulate_grad_batches == 0:  # grow at an accumulation boundary only
            # The deadline between evaluations: every rank computes the same time (same model, same step), so no
            # collective per batch.
            if not self._due() and self.stopped is None and \
                    self.schedule.due(trainer, self._grown(), lambda: self._events_needed(pl_module)):
                self.pending, self._reason = True, Reason.DEADLINE
            if self._due():  # after a mid-epoch validation, or the deadline
                self._act(trainer, pl_module)
        advance_ramps(pl_module, trainer.global_step)  # norms ramping new units in (another AutoGrow's too)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.resizer.observe(outputs, batch)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        self._gradmax.finish(trainer, pl_module)
        if self.policy.needs_gradients:
            self._gradients.add(pl_module, self.targets)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._due():
            self._act(trainer, pl_module)
        pl_module.log("autogrow/params", float(autogrow.num_params(pl_module)), prog_bar=True, rank_zero_only=True)
        pl_module.log("autogrow/lr_multiplier", self.schedule.multiplier(), rank_zero_only=True)

    def _due(self) -> bool:
        return self.pending or self._rollback_pending or self.resizer.pending is not None

    def _act(self, trainer: Any, pl_module: Any) -> None:
        if self.resizer.pending is not None and not self._rollback_pending:
            shrunk = self.resizer.shrink(self, trainer, pl_module)
            if shrunk is not None:
                reason, done, n_before, error = shrunk
                self._record(trainer, pl_module, reason, done.changes, n_before, error, measured_change=done.change)
        if self._rollback_pending:
            self._rollback_pending = self.pending = False
            n_before = autogrow.num_params(pl_module)
            snapshot, self._snapshot = self._snapshot, None
            self.targets = snapshot.restore(trainer, pl_module)
            self.schedule.rebuilt(trainer, pl_module, grew=False)
            self._record(trainer, pl_module, Reason.ROLLBACK, [], n_before, None)
        elif self.pending:
            self.pending = False
            grow_event(self, trainer, pl_module)
            self._catch_up(trainer, pl_module)

    def _catch_up(self, trainer: Any, pl_module: Any) -> None:
        """Growth events until the deadline's schedule is met: with fewer evaluations before the deadline than
        events still needed (a short run, many small steps), one evaluation brings several events."""
        grown = -1
        while grown != self._grown() and self.stopped is None and not self.pending:
            grown = self._grown()  # an event that did not grow ends the loop
            due = self.schedule.due(trainer, grown, lambda: self._events_needed(pl_module))
            if not bool(trainer.strategy.broadcast(due, src=0)):
                return
            self._reason = Reason.DEADLINE
            grow_event(self, trainer, pl_module)

    def _grown(self) -> int:
        return sum(e.grew for e in self.events)

    def _events_needed(self, pl_module: nn.Module) -> int:
        if not self.budget.sized:
            return 0
        candidates = self._candidates(pl_module)
        chosen = copy.deepcopy(self.policy).choose(candidates)  # a copy: choosing may advance its state
        widths = [c.width for c in candidates]
        return self.budget.events_needed(pl_module, self.action, chosen, widths, self._grown())

    def _candidates(self, pl_module: nn.Module) -> list[Candidate]:
        out = []
        for name in self.targets:
            if not self.action.can_grow(pl_module, name, self.budget.max_width) or not self.resizer.may_grow(name):
                continue  # at max_width, or shrunk and not to be regrown yet
            out.append(Candidate(name, width_of(pl_module.get_submodule(name)), self._gradients.score(name)))
        return out

    def _record(self, trainer: Any, pl_module: Any, reason: Reason, changes: list[Change], n_before: int,
                error: float | None, **extra: Any) -> None:
        event = GrowthEvent(len(self.events) + 1, trainer.current_epoch, trainer.global_step, self.monitor, self.best,
                            reason, changes, n_before, autogrow.num_params(pl_module), error, **extra)
        self.events.append(event)
        self.schedule.forget()  # the size changed: the deadline's next time with it
        report(trainer, pl_module, event)

    # -- checkpoints -------------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"history": history_of(pl_module), "ramps": ramp_state(pl_module)}

    def state_dict(self) -> dict[str, Any]:
        return dump_state(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the callback's state; tolerant of checkpoints from autogrow 0.1 (no ``version``)."""
        load_state(self, state_dict)
        self.schedule.forget()
