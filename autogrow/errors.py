"""The one exception autogrow raises for requests it refuses."""

from __future__ import annotations


class AutogrowError(ValueError):
    """A growth request that cannot be carried out exactly.

    Raised while planning or checking, before anything is changed: the model, optimizer and
    scheduler are left exactly as they were. The message names the argument or graph node at
    fault, the offending value and what would work instead.
    """
