"""Argument checks shared by the pipeline's parts: one wording for one kind of mistake."""

from edgesd.errors import InvalidArgumentError


def check_fraction(name: str, value) -> float:
    """`value` as a float in [0, 1] (a strength); NaN and non-numbers are refused by name."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= number <= 1.0:
        raise InvalidArgumentError(f"{name} must be in [0, 1], got {number}")
    return number
