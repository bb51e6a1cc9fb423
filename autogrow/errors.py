"""The one exception autogrow raises for requests it refuses, and the one argument checker.

Every refusal names the argument (or graph node) at fault, the offending value and what is allowed,
in one form: ``"<name>: <value> is not allowed; expected <what>"``.

    >>> check("factor", 1.0, False, "a number > 1")
    Traceback (most recent call last):
    ...
    autogrow.errors.AutogrowError: factor: 1.0 is not allowed; expected a number > 1
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import NoReturn

__all__ = ["AutogrowError", "NeedsShapes", "check", "check_bool", "check_choice", "check_float", "check_int",
           "check_steps", "fail", "steps_of_run"]


class AutogrowError(ValueError):
    """A growth request that cannot be carried out exactly, or an invalid argument.

    Raised while planning or checking, before anything is changed (or after an exact rollback): the
    model, optimizer and schedulers are left exactly as they were. The message names the argument or
    graph node at fault, the offending value and what would work instead.
    """


class NeedsShapes(AutogrowError):
    """Refused only because a tensor's rank or size is unknown: with ``example_inputs`` it may work."""


SHAPES_HINT = "Pass example_inputs=<a batch> so that autogrow sees every tensor's shape."
UNFUSE_HINT = ("Call autogrow.unfuse_attention(model) before building the optimizer: it rebuilds every "
               "nn.MultiheadAttention from Linears (the same function), whose heads and widths grow.")


def fail(message: str) -> NoReturn:
    """Raise :class:`AutogrowError` with ``message``."""
    raise AutogrowError(message)


def check(name: str, value: object, ok: bool, expected: str) -> None:
    """Refuse ``value`` of argument ``name`` unless ``ok``.

    Raises:
        AutogrowError: ``"<name>: <value!r> is not allowed; expected <expected>"``.
    """
    if not ok:
        fail(f"{name}: {value!r} is not allowed; expected {expected}")


def check_choice(name: str, value: object, choices: Collection[object]) -> None:
    """Refuse ``value`` unless it is one of ``choices``.

        >>> check_choice("mode", "up", ("min", "max"))
        Traceback (most recent call last):
        ...
        autogrow.errors.AutogrowError: mode: 'up' is not allowed; expected one of ('min', 'max')
    """
    try:
        ok = value in choices
    except TypeError:  # unhashable value
        ok = False
    check(name, value, ok, f"one of {tuple(choices)}")


def check_bool(name: str, value: object) -> None:
    """Refuse anything but ``True`` or ``False``."""
    check(name, value, isinstance(value, bool), "True or False")


def _is_int(value: object) -> bool:
    # numpy integers are accepted (they index like ints); bools are not.
    return not isinstance(value, bool) and hasattr(value, "__index__")


def check_int(name: str, value: object, low: int | None = None, high: int | None = None,
              optional: bool = False) -> None:
    """Refuse anything but an int in ``[low, high]`` (or ``None`` when ``optional``)."""
    if optional and value is None:
        return
    ok = _is_int(value) and (low is None or value >= low) and (high is None or value <= high)  # type: ignore[operator]
    bounds = " and ".join(b for b in ((f">= {low}" if low is not None else ""),
                                      (f"<= {high}" if high is not None else "")) if b)
    check(name, value, ok, f"an int{' ' + bounds if bounds else ''}{' or None' if optional else ''}")


def check_steps(name: str, value: object, low: int = 0, optional: bool = False) -> None:
    """Refuse anything but a length in optimizer steps: an int >= ``low``, or a fraction of the run in (0, 1) (or
    ``None`` when ``optional``)."""
    ok = (optional and value is None) or (_is_int(value) and value >= low) or (  # type: ignore[operator]
        isinstance(value, float) and 0 < value < 1)
    check(name, value, ok, f"an int >= {low} (steps) or a float in (0, 1) (a fraction of the run)"
          + (", or None" if optional else ""))


def steps_of_run(value: int | float, total_steps: int | None) -> int | None:
    """A length given as :func:`check_steps` allows, in steps: an int as it is, a fraction of a run of
    ``total_steps`` at least 1 step (``None`` while the run's length is unknown).

        >>> steps_of_run(100, None), steps_of_run(0.05, 1200), steps_of_run(0.05, None)
        (100, 60, None)
    """
    if isinstance(value, float):
        return max(1, round(value * total_steps)) if total_steps else None
    return value


def check_float(name: str, value: object, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    """Refuse anything but a finite number in the given interval (or ``None`` when ``optional``)."""
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low  # type: ignore[operator]
    if ok and high is not None:
        ok = value < high if high_open else value <= high  # type: ignore[operator]
    if low is not None and high is not None:
        what = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        what = f"a number {'>' if low_open else '>='} {low}"
    elif high is not None:
        what = f"a number {'<' if high_open else '<='} {high}"
    else:
        what = "a finite number"
    check(name, value, ok, what + (" or None" if optional else ""))
