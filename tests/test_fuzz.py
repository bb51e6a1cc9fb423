"""Property: on random networks full of once-troublesome constructs, every growth is exact (and trains)
or refused with the model and optimizer byte-identical. The benchmark-sized run of the same generator is
``python -m autogrow.experiments.fuzz --cases 5000``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from autogrow.experiments.fuzz import BAD, run_case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


class HypothesisDraw:
    """The fuzz generator's choices drawn by hypothesis (so failures shrink to a small network)."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def choice(self, options: Sequence[Any]) -> Any:
        return self.data.draw(st.sampled_from(list(options)))

    def integer(self, low: int, high: int) -> int:
        return self.data.draw(st.integers(low, high))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_every_growth_is_exact_or_cleanly_refused(data):
    outcomes = run_case(HypothesisDraw(data))
    bad = [o for o in outcomes if o.kind in BAD]
    assert not bad, [(o.kind, o.op, o.blocks, o.detail) for o in bad]
    assert outcomes
