"""Argument checks shared by the pipeline's parts: one wording for one kind of mistake."""

import numpy as np

from edgesd.errors import InvalidArgumentError


def check_int(name: str, value, low: int, high: int) -> int:
    """`value` as an int in [low, high]; integral floats pass, bools and strings do not."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) and not (
            isinstance(value, float) and value.is_integer()):
        raise InvalidArgumentError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if not low <= value <= high:
        raise InvalidArgumentError(f"{name} must be between {low} and {high}, got {value}")
    return value


def check_number(name: str, value, low: float, high: float, allowed: str) -> float:
    """`value` as a float in [low, high] (`allowed` says so in words); NaN and non-numbers are refused by name."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{name} must be a number {allowed}, got {value!r}") from None
    if not low <= number <= high:
        raise InvalidArgumentError(f"{name} must be {allowed}, got {number}")
    return number


def check_fraction(name: str, value) -> float:
    """`value` as a float in [0, 1] (a strength)."""
    return check_number(name, value, 0.0, 1.0, "in [0, 1]")
