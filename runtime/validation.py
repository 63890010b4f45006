"""Argument checks shared by the pipeline's parts: one wording for one kind of mistake."""

from edgesd.errors import InvalidArgumentError


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
