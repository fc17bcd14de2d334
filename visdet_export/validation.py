"""Build-time checks of loss hyper-parameters.

Every check raises :class:`ConfigError` (a ``ValueError``) naming the parameter, the offending value and what is
allowed, so a bad config fails once, when the loss is built, and never inside a compiled or exported graph.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Optional


class ConfigError(ValueError):
    """A loss configuration that cannot be built (unknown type or key, or an invalid value)."""


#: Modules to import before a command runs (comma-separated): losses of one's own register themselves on import.
#: Here rather than in the registry, which imports torch, so that the command line reads it without torch.
PLUGINS_VARIABLE = "VISDET_EXPORT_PLUGINS"


def plugin_names(names: Sequence[str] = ()) -> list[str]:
    """The plugin modules to import: those of ``$VISDET_EXPORT_PLUGINS``, then ``names``."""
    listed = [name.strip() for name in os.environ.get(PLUGINS_VARIABLE, "").split(",") if name.strip()]
    return [*listed, *names]


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")
    return value


class StaticFloat(float):
    """A float hyper-parameter that ``torch.compile`` bakes into the graph as a constant, guarded on its value.

    Dynamo makes a plain ``float`` attribute of a module a symbolic graph input (under ``dynamic=True``, or once a
    second value is seen), and torch 2.13's inductor caches (the on-disk one too, across processes) then serve the
    kernel compiled for one value to a module configured with another wherever torch specialises the float late
    (a ``clamp`` bound, a ``where`` branch): IoU losses computed with another ``eps``. Read through
    :func:`visdet_export.numerics.static` in ``forward``, it is a constant. Eager, TorchScript and the exporters see
    a float.
    """

    #: The value as its shortest exact string, which ``float()`` reads back. Dynamo reads a string as a constant
    #: guarded on its value wherever it is held (torch 2.11 cannot trace ``float()`` of a float subclass, and a
    #: float, or a tuple of them, held by a global or a default argument would be a symbolic input again), and
    #: folds ``float()`` of it.
    literal: str

    def __new__(cls, value: object) -> StaticFloat:
        number = super().__new__(cls, value)  # type: ignore[arg-type]
        number.literal = float.__repr__(number)
        return number

    # Dynamo fails to compare a tensor with an object it does not know unless the object's own comparison (the
    # reflected one, which Python tries second) traces: read as a constant, a plain comparison then decides.
    def __lt__(self, other: object) -> Any:
        return float(self.literal) < other  # type: ignore[operator]

    def __le__(self, other: object) -> Any:
        return float(self.literal) <= other  # type: ignore[operator]

    def __gt__(self, other: object) -> Any:
        return float(self.literal) > other  # type: ignore[operator]

    def __ge__(self, other: object) -> Any:
        return float(self.literal) >= other  # type: ignore[operator]

    def __eq__(self, other: object) -> Any:
        return float(self.literal) == other

    def __ne__(self, other: object) -> Any:
        return float(self.literal) != other

    __hash__ = float.__hash__


#: The largest float32. Every hyper-parameter is a float32 constant of float32 losses and of the exported graphs:
#: beyond it eager raises at the call and the compiled, scripted and exported losses give inf / NaN.
FLOAT32_MAX = 3.4028234663852886e38
#: The smallest normal float32 (its reciprocal 8.5e37 is finite). Below it float32 numbers are denormal, losing
#: precision, and below 2.9e-39 their reciprocals overflow: the least divisor a loss takes.
FLOAT32_TINY = 1.1754943508222875e-38


def check_float(
    name: str,
    value: object,
    *,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    min_inclusive: bool = True,
    allowed: Sequence[float] = (),
    why: str = "",
) -> StaticFloat:
    """A finite real number within bounds (numpy's included: configs read through numpy), as a
    :class:`StaticFloat`; ``allowed`` lists sentinel values accepted outside them, ``why`` ends the message of a
    value out of range (the reason for the bounds, what to write instead)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    number = StaticFloat(value)
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    if abs(number) > FLOAT32_MAX:
        raise ConfigError(
            f"{name}={value!r} is out of float32's range; it must be within +-{FLOAT32_MAX!r}: the losses compute "
            "in float32, where it would be inf"
        )
    if number in allowed:
        return number
    low_ok = minimum is None or (number >= minimum if min_inclusive else number > minimum)
    high_ok = maximum is None or number <= maximum
    if not (low_ok and high_ok):
        low = "" if minimum is None else (f">= {minimum}" if min_inclusive else f"> {minimum}")
        high = "" if maximum is None else f"<= {maximum}"
        bounds = " and ".join(part for part in (low, high) if part)
        extra = f" (or exactly {', '.join(map(str, allowed))})" if allowed else ""
        reason = f": {why}" if why else ""
        raise ConfigError(f"{name}={value!r} is out of range; it must be {bounds}{extra}{reason}")
    return number


def check_divisor(name: str, value: object, *, maximum: Optional[float] = None, why: str = "") -> StaticFloat:
    """A positive number a loss divides by: at least :data:`FLOAT32_TINY`, so its reciprocal is finite in
    float32 (SmoothL1's beta of 1e-39 raised at the call in eager and gave NaN in the other runtimes)."""
    why = why or f"the loss divides by {name}, and 1 / {name} must be finite in float32"
    return check_float(name, value, minimum=FLOAT32_TINY, maximum=maximum, why=why)


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}")
    return value


def check_int(name: str, value: object, *, minimum: Optional[int] = None) -> int:
    """An integer (numpy's included), as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} is out of range; it must be >= {minimum}")
    return int(value)


def check_names(what: str, value: Iterable[str]) -> list[str]:
    """A list of names: a single string would read as its characters (``"weight"`` as w, e, i, ...)."""
    if isinstance(value, str):
        raise ConfigError(f"{what} takes a list of names, got the string {value!r}; write [{value!r}]")
    return [str(name) for name in value]


def check_class_weight(value: object) -> Optional[list[float]]:
    """``None`` or a non-empty list (tuple, 1-d array or tensor) of non-negative numbers up to :data:`FLOAT32_MAX`
    (one per class)."""
    if value is None:
        return None
    tolist = getattr(value, "tolist", None)
    if callable(tolist) and getattr(value, "ndim", None) == 1:  # a numpy array or tensor
        value = tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise ConfigError(f"class_weight must be None or a non-empty list of numbers, got {value!r}")
    return [
        float(check_float(f"class_weight[{i}]", item, minimum=0.0, maximum=FLOAT32_MAX)) for i, item in enumerate(value)
    ]


def warn_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first frame outside this package: the user's line, whether the loss was
    built directly or through the registry, so that Python's default filters show a DeprecationWarning there."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(0), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


__all__ = [
    "FLOAT32_MAX",
    "FLOAT32_TINY",
    "ConfigError",
    "StaticFloat",
    "check_bool",
    "check_choice",
    "check_class_weight",
    "check_divisor",
    "check_float",
    "check_int",
    "check_names",
    "warn_caller",
]
