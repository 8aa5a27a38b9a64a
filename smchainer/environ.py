"""Whole-number settings, from the command line or the environment, checked one way.

Every smchainer setting that must be a whole number of at least 1 (workers,
timeouts, threads, batch limits, top-k) goes through :func:`positive_int`,
so a bad value always reads ``NAME must be a positive integer (a whole
number, at least 1), not 'x'``, whichever command or plugin reads it.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TypeVar

from smchainer.errors import SmchainerError

Default = TypeVar("Default", int, None)


def positive_int(value: str | int, what: str,
                 error: type[Exception] = SmchainerError) -> int:
    """``value`` as an integer >= 1, or ``error`` naming ``what``."""
    try:
        number = int(str(value).strip())
    except ValueError:
        number = 0
    if number < 1:
        raise error(f"{what} must be a positive integer (a whole number, at least 1), "
                    f"not {value!r}")
    return number


def env_positive_int(name: str, default: Default, environ: Mapping[str, str] | None = None,
                     error: type[Exception] = SmchainerError) -> int | Default:
    """The variable ``name`` as :func:`positive_int`; ``default`` when it is unset or empty."""
    raw = (os.environ if environ is None else environ).get(name, "").strip()
    return positive_int(raw, name, error) if raw else default
