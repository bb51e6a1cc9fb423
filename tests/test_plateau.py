"""Growth triggers, compared against references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_lightning.callbacks import EarlyStopping

from autogrow.plateau import DynamicNodeCreation, EveryN, Plateau

values = st.lists(st.floats(0.0, 2.0, allow_nan=False), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(vals=values, patience=st.integers(1, 5), min_delta=st.sampled_from([0.0, 0.01, 0.1]),
       mode=st.sampled_from(["min", "max"]))
def test_plateau_fires_exactly_when_early_stopping_would_stop(vals, patience, min_delta, mode):
    es = EarlyStopping(monitor="m", patience=patience, min_delta=min_delta, mode=mode)
    trig = Plateau(mode=mode, patience=patience, min_delta=min_delta)
    for v in vals:
        should_stop, _ = es._evaluate_stopping_criteria(torch.tensor(v, dtype=torch.float64))
        assert trig.update(v) == should_stop
        if should_stop:  # both restart counting: EarlyStopping would have stopped, we grew
            es.wait_count = 0
            trig.notify_growth()


@settings(max_examples=200, deadline=None)
@given(vals=values, window=st.integers(1, 4), threshold=st.sampled_from([0.01, 0.05, 0.2]))
def test_dynamic_node_creation_matches_ash_formula(vals, window, threshold):
    trig = DynamicNodeCreation(window=window, threshold=threshold)
    t0 = 0  # index of the last growth (or the start)
    for t, v in enumerate(vals):
        expected = t - t0 >= window and abs(vals[t] - vals[t - window]) / max(abs(vals[t0]), 1e-12) < threshold \
            and vals[t] <= vals[t - window]
        # Ash's rule on an error that went up over the window is a "no improvement": grow as well.
        expected = expected or (t - t0 >= window and vals[t] > vals[t - window])
        fired = trig.update(v)
        assert fired == expected, (t, v)
        if fired:
            trig.notify_growth()
            t0 = t


def test_warmup_cooldown_nonfinite_and_state_round_trip():
    trig = Plateau(patience=1, warmup=2, cooldown=1)
    assert [trig.update(v) for v in [1.0, 1.0, 1.0]] == [False, False, True]
    trig.notify_growth()
    assert trig.update(1.0) is False  # cooldown
    assert trig.update(math.nan) is False and trig.evaluations == 4  # NaN is not an evaluation
    clone = Plateau(patience=1, warmup=2, cooldown=1)
    clone.load_state_dict(trig.state_dict())
    assert [clone.update(v) for v in [1.0, 0.5, 0.5]] == [trig.update(v) for v in [1.0, 0.5, 0.5]]
    every = EveryN(every=3, warmup=3)
    assert [every.update(0.0) for _ in range(7)] == [False] * 5 + [True, False]


@pytest.mark.parametrize("cls, kw, message", [
    (Plateau, {"patience": 0}, "patience: 0"), (Plateau, {"mode": "up"}, "mode: 'up'"),
    (Plateau, {"min_delta": -1}, "min_delta: -1"), (DynamicNodeCreation, {"threshold": 0}, "threshold: 0"),
    (EveryN, {"every": 0}, "every: 0"), (EveryN, {"warmup": -1}, "warmup: -1"),
])
def test_bad_arguments(cls, kw, message):
    with pytest.raises(ValueError, match=message):
        cls(**kw)
