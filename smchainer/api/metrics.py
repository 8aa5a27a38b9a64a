"""Training metrics read from a job's log with regexes, as SageMaker reads them.

SageMaker finds a job's metrics in its logs with the estimator's (or the
tuner's) ``metric_definitions``: ``[{"Name": "validation:accuracy", "Regex":
"validation/main/accuracy=([0-9.]+)"}]``. Every match of a definition's regex
is one value, in log order; its first capture group (the whole match when
there is none) is parsed as a float, and a match that does not parse is left
out. A job's final value of a metric is its last one.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

#: The most definitions a job may have (SageMaker's limit).
MAX_DEFINITIONS = 40


def check_definitions(definitions: Any) -> list[dict[str, str]]:
    """``definitions`` as a list of ``{"Name", "Regex"}``, each regex compiled once to check it."""
    if definitions is None:
        return []
    if not isinstance(definitions, list | tuple) or len(definitions) > MAX_DEFINITIONS:
        raise ValueError(f"metric_definitions must be a list of at most {MAX_DEFINITIONS} "
                         "{'Name': ..., 'Regex': ...} dicts")
    checked = []
    for definition in definitions:
        if not isinstance(definition, Mapping) or not {"Name", "Regex"} <= set(definition):
            raise ValueError(f"metric definition {definition!r}: expected a dict with 'Name' "
                             "and 'Regex'")
        name, pattern = str(definition["Name"]), str(definition["Regex"])
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"metric {name!r}: bad regex {pattern!r}: {error}") from None
        checked.append({"Name": name, "Regex": pattern})
    return checked


def metric_values(text: str, definitions: Iterable[Mapping[str, str]]) -> dict[str, list[float]]:
    """Every value of every defined metric in ``text``, in order (a metric never seen: [])."""
    found: dict[str, list[float]] = {}
    for definition in definitions:
        values = found.setdefault(definition["Name"], [])
        for match in re.finditer(definition["Regex"], text):
            try:
                values.append(float(match.group(1) if match.groups() else match.group(0)))
            except (TypeError, ValueError):
                continue
    return found


def final_metrics(text: str, definitions: Iterable[Mapping[str, str]]) -> list[dict[str, Any]]:
    """``FinalMetricDataList`` as ``DescribeTrainingJob`` gives it: each metric's last value."""
    return [{"MetricName": name, "Value": values[-1]}
            for name, values in metric_values(text, definitions).items() if values]
