"""Training metrics read from a job's log with regexes, as SageMaker reads them.

SageMaker finds a job's metrics in its logs with the estimator's (or the
tuner's) ``metric_definitions``: ``[{"Name": "validation:accuracy", "Regex":
"validation/main/accuracy=([0-9.]+)"}]``. Each line of the log is searched
with each regex; every match whose first capture group parses as a number
is one value, in log order (a regex needs that group). A job's final value
of a metric is its last one.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: The most definitions a job may have (SageMaker's limit).
MAX_DEFINITIONS = 40

Compiled = list[tuple[str, re.Pattern[str]]]


def compile_definitions(definitions: Any) -> Compiled:
    """``[{"Name": ..., "Regex": ...}]`` checked and compiled; a ValueError says what is wrong."""
    if not isinstance(definitions, Sequence) or isinstance(definitions, str | bytes) \
            or len(definitions) > MAX_DEFINITIONS:
        raise ValueError(f"metric_definitions must be a list of at most {MAX_DEFINITIONS} "
                         f"{{'Name': ..., 'Regex': ...}} dicts, not {definitions!r}")
    compiled = []
    for definition in definitions:
        if not (isinstance(definition, Mapping) and isinstance(definition.get("Name"), str)
                and isinstance(definition.get("Regex"), str)):
            raise ValueError(f"metric definition {definition!r}: give a dict with a 'Name' "
                             "and a 'Regex' (strings)")
        name, regex = definition["Name"], definition["Regex"]
        try:
            pattern = re.compile(regex)
        except re.error as error:
            raise ValueError(f"metric {name!r}: regex {regex!r} does not compile: "
                             f"{error}") from None
        if pattern.groups < 1:
            raise ValueError(f"metric {name!r}: regex {regex!r} needs a capture group around "
                             "the value, as SageMaker reads the first group")
        compiled.append((name, pattern))
    return compiled


def check_definitions(definitions: Any) -> list[dict[str, str]]:
    """``definitions`` checked (:func:`compile_definitions`), as plain dicts; None: none."""
    if definitions is None:
        return []
    return [{"Name": name, "Regex": pattern.pattern}
            for name, pattern in compile_definitions(definitions)]


def line_metrics(line: str, compiled: Compiled) -> list[tuple[str, float]]:
    """The ``(metric, value)`` pairs one log line holds, in the definitions' order."""
    found = []
    for name, pattern in compiled:
        for match in pattern.finditer(line):
            try:
                found.append((name, float(match.group(1))))
            except (TypeError, ValueError):
                continue
    return found


def metric_values(text: str, definitions: Iterable[Mapping[str, str]]) -> dict[str, list[float]]:
    """Every value of each defined metric in a log ``text``, in order (never seen: [])."""
    compiled = compile_definitions(list(definitions))
    values: dict[str, list[float]] = {name: [] for name, _ in compiled}
    for line in text.splitlines():
        for name, value in line_metrics(line, compiled):
            values[name].append(value)
    return values


def final_metrics(text: str, definitions: Iterable[Mapping[str, str]]) -> list[dict[str, Any]]:
    """``FinalMetricDataList`` as ``DescribeTrainingJob`` gives it: each metric's last value."""
    return [{"MetricName": name, "Value": values[-1]}
            for name, values in metric_values(text, definitions).items() if values]
