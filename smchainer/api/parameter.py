"""Hyperparameter ranges of a tuning job, by the SageMaker SDK's names.

``ContinuousParameter(min, max)`` and ``IntegerParameter(min, max)`` take a
``scaling_type``, as on SageMaker:

``"Auto"``
    Linear here (SageMaker chooses a scale itself; this tuner does not guess).
``"Linear"``
    Uniform between the bounds.
``"Logarithmic"``
    Log-uniform: every decade is as likely as every other. The range must be
    positive (``min_value > 0``; 1 and up for an integer range).
``"ReverseLogarithmic"``
    Continuous ranges within ``0 <= min_value < max_value < 1`` only: ``1 - x``
    is drawn log-uniformly between ``1 - max_value`` and ``1 - min_value``, so
    that values close to 1 (a momentum of 0.9, 0.99, 0.999) are as likely as
    each other.

``CategoricalParameter(values)`` picks one of ``values``; as in the SDK, each
value becomes a string (``[32, 64]`` gives ``"32"`` or ``"64"``), which is what
the script gets on SageMaker too.

A range is checked when a :class:`~smchainer.api.tuner.HyperparameterTuner`
is made from it, so that the :class:`ValueError` can name the hyperparameter.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

SCALING_TYPES = ("Auto", "Linear", "Logarithmic", "ReverseLogarithmic")


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


class ParameterRange:
    """A range of numbers (the base of :class:`ContinuousParameter` and :class:`IntegerParameter`).

    :param min_value: the smallest value to try.
    :param max_value: the largest value to try.
    :param scaling_type: ``Auto``, ``Linear``, ``Logarithmic`` or ``ReverseLogarithmic``.
    """

    #: the kind of range, as the SDK names it on instances (``Continuous``, ``Integer``)
    __name__ = "Range"

    def __init__(self, min_value: Any, max_value: Any, scaling_type: str = "Auto") -> None:
        if scaling_type not in SCALING_TYPES:
            raise ValueError(f"scaling_type {scaling_type!r}: use one of "
                             f"{', '.join(SCALING_TYPES)}")
        self.min_value = min_value
        self.max_value = max_value
        self.scaling_type = scaling_type

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.min_value!r}, {self.max_value!r}, "
                f"scaling_type={self.scaling_type!r})")

    def is_valid(self, value: Any) -> bool:
        """Whether ``value`` lies in the range."""
        return _is_number(value) and self.min_value <= value <= self.max_value

    @classmethod
    def cast_to_type(cls, value: Any) -> Any:
        """``value`` as the range's type (a string from a job's hyperparameters, say)."""
        return float(value)

    def as_tuning_range(self, name: str) -> dict[str, str]:
        """The range as ``CreateHyperParameterTuningJob`` writes it (values as strings)."""
        return {"Name": name, "MinValue": str(self.min_value), "MaxValue": str(self.max_value),
                "ScalingType": self.scaling_type}

    def as_json_range(self, name: str) -> dict[str, str]:
        """The SDK's name of :meth:`as_tuning_range` for framework estimators."""
        return self.as_tuning_range(name)

    # What the tuner uses (not part of the SDK).

    def check(self, name: str) -> None:
        """Raise :class:`ValueError`, naming hyperparameter ``name``, when the range is bad."""
        low, high = self.min_value, self.max_value
        if not (_is_number(low) and _is_number(high)):
            raise ValueError(f"hyperparameter {name!r}: min_value and max_value must be "
                             f"numbers, not {low!r} and {high!r}")
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"hyperparameter {name!r}: the range [{low}, {high}] must be finite")
        if low > high:
            raise ValueError(f"hyperparameter {name!r}: min_value {low} is above "
                             f"max_value {high}")
        if self.scaling_type == "Logarithmic" and low <= 0:
            raise ValueError(f"hyperparameter {name!r}: Logarithmic scaling needs a positive "
                             f"range, and [{low}, {high}] is not (min_value must be > 0)")

    def distribution(self, name: str) -> BaseDistribution:
        """The Optuna distribution that the sampler draws from."""
        raise NotImplementedError

    def from_sample(self, sample: Any) -> Any:
        """The hyperparameter value of one of :meth:`distribution`'s samples."""
        return sample

    def grid_values(self, name: str) -> list[Any]:
        """Every value of the range, for the ``Grid`` strategy."""
        raise ValueError(f"hyperparameter {name!r}: the Grid strategy takes categorical and "
                         f"integer ranges, not a {type(self).__name__} one")


class ContinuousParameter(ParameterRange):
    """Real numbers between ``min_value`` and ``max_value``."""

    __name__ = "Continuous"

    def check(self, name: str) -> None:
        super().check(name)
        low, high = self.min_value, self.max_value
        if self.scaling_type == "ReverseLogarithmic" and not 0 <= low < high < 1:
            raise ValueError(f"hyperparameter {name!r}: ReverseLogarithmic scaling needs "
                             f"0 <= min_value < max_value < 1, and [{low}, {high}] is not")

    def distribution(self, name: str) -> BaseDistribution:
        from optuna.distributions import FloatDistribution

        low, high = float(self.min_value), float(self.max_value)
        if self.scaling_type == "ReverseLogarithmic":
            return FloatDistribution(1.0 - high, 1.0 - low, log=True)
        return FloatDistribution(low, high, log=self.scaling_type == "Logarithmic")

    def from_sample(self, sample: Any) -> float:
        value = float(sample)
        if self.scaling_type == "ReverseLogarithmic":
            value = 1.0 - value
        # 1 - (1 - x) may round a hair outside the range.
        return min(max(value, float(self.min_value)), float(self.max_value))


class IntegerParameter(ParameterRange):
    """Whole numbers from ``min_value`` to ``max_value``, both included."""

    __name__ = "Integer"

    def __init__(self, min_value: Any, max_value: Any, scaling_type: str = "Auto") -> None:
        super().__init__(min_value, max_value, scaling_type)
        if scaling_type == "ReverseLogarithmic":
            raise ValueError("ReverseLogarithmic scaling is for ContinuousParameter ranges "
                             "within (0, 1) only, not IntegerParameter")

    def is_valid(self, value: Any) -> bool:
        return super().is_valid(value) and int(value) == value

    @classmethod
    def cast_to_type(cls, value: Any) -> int:
        return int(value)

    def check(self, name: str) -> None:
        super().check(name)
        for value in (self.min_value, self.max_value):
            if int(value) != value:
                raise ValueError(f"hyperparameter {name!r}: an IntegerParameter range needs "
                                 f"whole numbers, not {value!r}")

    def distribution(self, name: str) -> BaseDistribution:
        from optuna.distributions import IntDistribution

        return IntDistribution(int(self.min_value), int(self.max_value),
                               log=self.scaling_type == "Logarithmic")

    def from_sample(self, sample: Any) -> int:
        return int(sample)

    def grid_values(self, name: str) -> list[Any]:
        return list(range(int(self.min_value), int(self.max_value) + 1))


class CategoricalParameter:
    """One of ``values`` (each a string, as the SDK makes them)."""

    __name__ = "Categorical"

    def __init__(self, values: Any) -> None:
        if isinstance(values, (list, tuple)):
            self.values = [value if isinstance(value, str) else str(value) for value in values]
        else:
            self.values = [values if isinstance(values, str) else str(values)]

    def __repr__(self) -> str:
        return f"CategoricalParameter({self.values!r})"

    def is_valid(self, value: Any) -> bool:
        """Whether ``value`` is one of the values."""
        return value in self.values

    @classmethod
    def cast_to_type(cls, value: Any) -> str:
        return str(value)

    def as_tuning_range(self, name: str) -> dict[str, Any]:
        """The range as ``CreateHyperParameterTuningJob`` writes it."""
        return {"Name": name, "Values": list(self.values)}

    def as_json_range(self, name: str) -> dict[str, Any]:
        return self.as_tuning_range(name)

    def check(self, name: str) -> None:
        """Raise :class:`ValueError`, naming hyperparameter ``name``, when the values are bad."""
        if not self.values:
            raise ValueError(f"hyperparameter {name!r}: a CategoricalParameter needs at least "
                             "one value")
        if len(set(self.values)) != len(self.values):
            raise ValueError(f"hyperparameter {name!r}: the values {self.values} repeat one")

    def distribution(self, name: str) -> BaseDistribution:
        from optuna.distributions import CategoricalDistribution

        return CategoricalDistribution(list(self.values))

    def from_sample(self, sample: Any) -> str:
        return str(sample)

    def grid_values(self, name: str) -> list[Any]:
        return list(self.values)


#: any of the three range classes
Range = ParameterRange | CategoricalParameter
