"""``HyperparameterTuner``: SageMaker's hyperparameter tuning jobs, run here with Optuna.

A tuning job runs up to ``max_jobs`` training jobs, ``max_parallel_jobs`` at a
time, each with hyperparameters that Optuna picks from the ranges
(:mod:`smchainer.api.parameter`) merged over the estimator's own::

    from smchainer.api import Chainer
    from smchainer.api.tuner import ContinuousParameter, HyperparameterTuner

    estimator = Chainer(entry_point="train.py", hyperparameters={"epochs": 10})
    tuner = HyperparameterTuner(
        estimator, "validation-accuracy", {"lr": ContinuousParameter(1e-4, 1e-1,
                                                                     "Logarithmic")},
        metric_definitions=[{"Name": "validation-accuracy",
                             "Regex": r"validation-accuracy=([0-9.]+)"}],
        max_jobs=8, max_parallel_jobs=2)
    tuner.fit({"train": "data/train"})
    tuner.best_training_job()            # the name of the best completed job
    tuner.analytics().dataframe()        # one row per job
    predictor = tuner.deploy(initial_instance_count=1, instance_type="local")

Each training job is a real ``smchainer-train`` job in the estimator's
``jobs_dir``, named ``<tuning job name>-<NNN>-<8 hex digits>`` as SageMaker
names them. Metrics are read from the job's ``train.log`` with the
``metric_definitions`` regexes (the first capture group of each match is a
value); the job's objective is the last value of ``objective_metric_name`` it
printed, as SageMaker takes the last value a job emitted. A job that completes
without printing the objective, and a job that fails, are failed jobs of the
tuning job, which goes on with the others.

Strategies are Optuna samplers: ``Bayesian`` is TPE, ``Random`` random
sampling, ``Grid`` every combination of categorical and integer ranges, and
``Hyperband`` random sampling with Optuna's Hyperband pruner.
``early_stopping_type="Auto"`` stops a job whose objective is worse than the
median of the completed jobs at the same step (Optuna's ``MedianPruner``);
such a job's status is ``Stopped``. The tuning job's record is
``<jobs_dir>/<tuning job name>/tuning.json``, which :meth:`HyperparameterTuner.attach`
and :class:`HyperparameterTuningJobAnalytics` read back.
"""
from __future__ import annotations

import atexit
import copy
import csv
import datetime
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smchainer.api.estimator import DEFAULT_BASE_JOB_NAME, Chainer, Estimator, TrainingJob
from smchainer.api.local_mode import positive_int, warn_ignored
from smchainer.api.metrics import compile_definitions, line_metrics, metric_values
from smchainer.api.parameter import (
    CategoricalParameter,
    ContinuousParameter,
    IntegerParameter,
    ParameterRange,
)
from smchainer.api.session import Session, local_path
from smchainer.errors import SmchainerError

if TYPE_CHECKING:
    import optuna

    from smchainer.api.parameter import Range

logger = logging.getLogger(__name__)

# The ranges are importable from here too, as from ``sagemaker.tuner``.
__all__ = [
    "CategoricalParameter", "ContinuousParameter", "HyperparameterTuner",
    "HyperparameterTuningJobAnalytics", "IntegerParameter", "TuningJob", "TuningJobError",
    "metric_values", "read_record",
]

#: The tuning job's record, in ``<jobs_dir>/<tuning job name>/``.
RECORD = "tuning.json"
#: Seconds between two looks at the running jobs.
POLL_SECONDS = 0.2
#: SageMaker's limit on a tuning job's name.
TUNING_JOB_NAME_LIMIT = 32
_TUNING_JOB_NAME = re.compile(r"^[A-Za-z0-9](-*[A-Za-z0-9]){0,31}$")
_BASE_NAME_CHARS = re.compile(r"[^A-Za-z0-9-]+")
#: ``early_stopping_type="Auto"``: jobs that must complete before any is stopped early.
EARLY_STOPPING_STARTUP_TRIALS = 3
#: ``early_stopping_type="Auto"``: objective values a job prints before it may be stopped.
EARLY_STOPPING_WARMUP_STEPS = 1
STRATEGIES = ("Bayesian", "Random", "Grid", "Hyperband")
OBJECTIVE_TYPES = ("Maximize", "Minimize")
EARLY_STOPPING_TYPES = ("Off", "Auto")
_TIME_KEYS = ("CreationTime", "HyperParameterTuningEndTime", "LastModifiedTime",
              "TrainingStartTime", "TrainingEndTime")


class TuningJobError(SmchainerError):
    """A tuning job failed (every training job failed, or one could not start)."""

    def __init__(self, tuning_job_name: str, reason: str) -> None:
        self.tuning_job_name = tuning_job_name
        self.reason = reason
        super().__init__(f"tuning job {tuning_job_name} failed: {reason}")


def _now() -> datetime.datetime:
    return datetime.datetime.now().astimezone()


def _choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` as one of ``choices`` (any case), else a ValueError listing them."""
    for choice in choices:
        if isinstance(value, str) and value.lower() == choice.lower():
            return choice
    raise ValueError(f"{name} {value!r}: use one of {', '.join(choices)}")


def _tuning_job_name(base: str, jobs_dir: Path) -> str:
    """``<base>-yymmdd-HHMM`` within 32 characters, as the SDK names tuning jobs.

    SageMaker names are unique per account; here a name already used in
    ``jobs_dir`` gets 4 random hex digits more.
    """
    stamp = time.strftime("%y%m%d-%H%M")
    base = _BASE_NAME_CHARS.sub("-", base).strip("-") or "smchainer"
    name = f"{base[:TUNING_JOB_NAME_LIMIT - len(stamp) - 1].rstrip('-')}-{stamp}"
    while (jobs_dir / name).exists():
        suffix = f"{stamp}-{secrets.token_hex(2)}"
        name = f"{base[:TUNING_JOB_NAME_LIMIT - len(suffix) - 1].rstrip('-')}-{suffix}"
    return name


def _parse_times(record: Any) -> Any:
    """A record read from ``tuning.json`` with its ISO times as datetimes again."""
    if isinstance(record, list):
        return [_parse_times(item) for item in record]
    if isinstance(record, dict):
        return {key: (datetime.datetime.fromisoformat(value)
                      if key in _TIME_KEYS and isinstance(value, str) else _parse_times(value))
                for key, value in record.items()}
    return record


def _range_from_record(kind: str, entry: Mapping[str, Any]) -> Range:
    if kind == "Categorical":
        return CategoricalParameter(list(entry["Values"]))
    cls = ContinuousParameter if kind == "Continuous" else IntegerParameter
    return cls(cls.cast_to_type(entry["MinValue"]), cls.cast_to_type(entry["MaxValue"]),
               entry.get("ScalingType", "Auto"))


def _hyperband_resources(strategy_config: Any) -> tuple[int, int | str]:
    """``(min_resource, max_resource)`` of a ``Hyperband`` strategy's config (SDK or dict)."""
    if strategy_config is None:
        return 1, "auto"
    config = strategy_config
    if hasattr(config, "to_input_req"):
        config = config.to_input_req()
    if not isinstance(config, Mapping):
        raise ValueError(f"strategy_config {strategy_config!r}: give the SDK's StrategyConfig "
                         "or {'HyperbandStrategyConfig': {'MinResource': m, 'MaxResource': n}}")
    hyperband = config.get("HyperbandStrategyConfig", config)
    low = positive_int("MinResource", hyperband.get("MinResource")) or 1
    high = positive_int("MaxResource", hyperband.get("MaxResource"))
    if high is not None and high < low:
        raise ValueError(f"Hyperband MaxResource {high} is below MinResource {low}")
    return low, high if high is not None else "auto"


@dataclass
class _Trial:
    """One training job of a tuning job, and what was read from its log."""

    number: int
    name: str
    hyperparameters: dict[str, Any]
    status: str = "InProgress"
    failure_reason: str | None = None
    #: every value of the objective metric, in order (step i is the i-th)
    objective: list[float] = field(default_factory=list)
    #: the last value of each metric
    metrics: dict[str, float] = field(default_factory=dict)
    final_objective: float | None = None
    early_stopped: bool = False
    creation_time: datetime.datetime = field(default_factory=_now)
    start_time: datetime.datetime | None = None
    end_time: datetime.datetime | None = None
    job_dir: str | None = None
    optuna_trial: Any = None
    estimator: Estimator | None = None
    job: TrainingJob | None = None
    log_offset: int = 0

    @property
    def objective_status(self) -> str:
        if self.status == "InProgress":
            return "Pending"
        return "Succeeded" if self.final_objective is not None else "Failed"

    def summary(self, tuning_job_name: str, objective_type: str,
                objective_metric_name: str) -> dict[str, Any]:
        """A ``HyperParameterTrainingJobSummary``, with local additions (steps, job dir)."""
        summary: dict[str, Any] = {
            "TrainingJobName": self.name,
            "TuningJobName": tuning_job_name,
            "TrialNumber": self.number,
            "CreationTime": self.creation_time,
            "TrainingJobStatus": self.status,
            "TunedHyperParameters": dict(self.hyperparameters),
            "ObjectiveStatus": self.objective_status,
        }
        if self.start_time is not None:
            summary["TrainingStartTime"] = self.start_time
        if self.end_time is not None:
            summary["TrainingEndTime"] = self.end_time
        if self.failure_reason:
            summary["FailureReason"] = self.failure_reason
        if self.final_objective is not None:
            summary["FinalHyperParameterTuningJobObjectiveMetric"] = {
                "Type": objective_type, "MetricName": objective_metric_name,
                "Value": self.final_objective}
        summary["ObjectiveMetricValues"] = list(self.objective)
        summary["FinalMetricValues"] = dict(self.metrics)
        summary["EarlyStopped"] = self.early_stopped
        if self.job_dir is not None:
            summary["JobDir"] = self.job_dir
        return summary

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any]) -> _Trial:
        final = summary.get("FinalHyperParameterTuningJobObjectiveMetric") or {}
        return cls(number=int(summary.get("TrialNumber", 0)), name=summary["TrainingJobName"],
                   hyperparameters=dict(summary.get("TunedHyperParameters", {})),
                   status=summary["TrainingJobStatus"],
                   failure_reason=summary.get("FailureReason"),
                   objective=list(summary.get("ObjectiveMetricValues", [])),
                   metrics=dict(summary.get("FinalMetricValues", {})),
                   final_objective=final.get("Value"),
                   early_stopped=bool(summary.get("EarlyStopped", False)),
                   creation_time=summary.get("CreationTime") or _now(),
                   start_time=summary.get("TrainingStartTime"),
                   end_time=summary.get("TrainingEndTime"), job_dir=summary.get("JobDir"))


class TuningJob:
    """One run of a tuning job: its training jobs, its Optuna study and its record on disk.

    :meth:`HyperparameterTuner.fit` makes one (``tuner.latest_tuning_job``).
    """

    def __init__(self, tuner: HyperparameterTuner, name: str, inputs: Any) -> None:
        self.tuner = tuner
        self.name = name
        self.inputs = inputs
        self.jobs_dir = tuner.jobs_dir
        self.job_dir = self.jobs_dir / name
        self.record_path = self.job_dir / RECORD
        self.status = "InProgress"
        self.failure_reason: str | None = None
        self.creation_time = _now()
        self.end_time: datetime.datetime | None = None
        self.last_modified = self.creation_time
        self.trials: list[_Trial] = []
        self.config = tuner._job_config()
        self._objective_type = tuner.objective_type
        self._objective_name = tuner.objective_metric_name
        self._lock = threading.RLock()
        self._stop_requested = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._grid: list[dict[str, Any]] = []
        self._study: optuna.Study | None = None
        self.max_jobs = tuner._planned_jobs()

    @classmethod
    def from_record(cls, record: Mapping[str, Any], jobs_dir: Path) -> TuningJob:
        """A tuning job read back from its ``tuning.json`` (nothing runs)."""
        job = cls.__new__(cls)
        job.tuner = None  # type: ignore[assignment]
        job.name = record["HyperParameterTuningJobName"]
        job.inputs = None
        job.jobs_dir = jobs_dir
        job.job_dir = jobs_dir / job.name
        job.record_path = job.job_dir / RECORD
        job.status = record["HyperParameterTuningJobStatus"]
        job.failure_reason = record.get("FailureReason")
        job.creation_time = record.get("CreationTime") or _now()
        job.end_time = record.get("HyperParameterTuningEndTime")
        job.last_modified = record.get("LastModifiedTime") or job.creation_time
        job.trials = [_Trial.from_summary(s) for s in record.get("TrainingJobSummaries", [])]
        job.config = {key: record[key] for key in
                      ("HyperParameterTuningJobConfig", "TrainingJobDefinition") if key in record}
        objective = job.config["HyperParameterTuningJobConfig"][
            "HyperParameterTuningJobObjective"]
        job._objective_type = objective["Type"]
        job._objective_name = objective["MetricName"]
        job._lock = threading.RLock()
        job._stop_requested = threading.Event()
        job._thread = None
        job._error = None
        job._grid = []
        job._study = None
        job.max_jobs = job.config["HyperParameterTuningJobConfig"]["ResourceLimits"][
            "MaxNumberOfTrainingJobs"]
        return job

    # -- what a user asks

    def describe(self) -> dict[str, Any]:
        """A ``DescribeHyperParameterTuningJob``-like dict."""
        with self._lock:
            trials = list(self.trials)
            counters = {"Completed": 0, "InProgress": 0, "RetryableError": 0,
                        "NonRetryableError": 0, "Stopped": 0}
            objectives = {"Succeeded": 0, "Pending": 0, "Failed": 0}
            for trial in trials:
                key = "NonRetryableError" if trial.status == "Failed" else trial.status
                counters[key] = counters.get(key, 0) + 1
                objectives[trial.objective_status] += 1
            description: dict[str, Any] = {
                "HyperParameterTuningJobName": self.name,
                **copy.deepcopy(self.config),
                "HyperParameterTuningJobStatus": self.status,
                "CreationTime": self.creation_time,
                "LastModifiedTime": self.last_modified,
                "TrainingJobStatusCounters": counters,
                "ObjectiveStatusCounters": objectives,
            }
            if self.end_time is not None:
                description["HyperParameterTuningEndTime"] = self.end_time
            best = self.best_trial()
            if best is not None:
                description["BestTrainingJob"] = self._summary(best)
            if self.failure_reason:
                description["FailureReason"] = self.failure_reason
            return description

    def training_job_summaries(self) -> list[dict[str, Any]]:
        """One ``HyperParameterTrainingJobSummary`` per training job, in the order they started."""
        with self._lock:
            return [self._summary(trial) for trial in self.trials]

    def best_trial(self) -> _Trial | None:
        """The completed job with the best objective (the first of equals), or None."""
        completed = [t for t in self.trials
                     if t.status == "Completed" and t.final_objective is not None
                     and not math.isnan(t.final_objective)]
        if not completed:
            return None
        sign = 1.0 if self._objective_type == "Maximize" else -1.0
        return max(completed, key=lambda t: (sign * (t.final_objective or 0.0), -t.number))

    def best_training_job(self) -> str:
        """The name of the best completed training job; an error says why there is none."""
        with self._lock:
            best = self.best_trial()
            if best is not None:
                return best.name
            states: dict[str, int] = {}
            for trial in self.trials:
                states[trial.status] = states.get(trial.status, 0) + 1
            failed = [t for t in self.trials if t.status == "Failed" and t.failure_reason]
        detail = ", ".join(f"{count} {state.lower()}" for state, count in sorted(states.items()))
        reason = f"no training job of tuning job {self.name} completed"
        reason += f" ({detail})" if detail else " (none has started)"
        if failed:
            reason += f"; the first failure: {failed[0].failure_reason}"
        elif self.status == "InProgress":
            reason += "; it is still running: wait() for it"
        raise SmchainerError(reason)

    def wait(self) -> None:
        """Wait for the tuning job; raise :class:`TuningJobError` if it failed."""
        thread = self._thread
        if thread is not None:
            try:
                while thread.is_alive():
                    thread.join(0.5)
            except KeyboardInterrupt:
                self.stop()
                thread.join()
                raise
        if self._error is not None:
            raise self._error
        if self.status == "Failed":
            raise TuningJobError(self.name, self.failure_reason or "see " + str(self.record_path))

    def stop(self) -> None:
        """Ask the tuning job to stop: running training jobs are stopped, no new one starts."""
        if self.status in ("InProgress", "Stopping"):
            self._stop_requested.set()

    # -- running

    def start(self, wait: bool) -> None:
        """Run the tuning job, here (``wait``) or in a background thread."""
        self._study = self.tuner._create_study()
        if self.tuner.strategy == "Grid":
            self._grid = self.tuner._grid_combinations(self.max_jobs)
        self.job_dir.mkdir(parents=True, exist_ok=True)
        self._write_record()
        if wait:
            self._run()
            self.wait()
            return
        self._thread = threading.Thread(target=self._run_in_background,
                                        name=f"tuning-{self.name}", daemon=True)
        atexit.register(self._stop_at_exit)
        self._thread.start()

    def _run_in_background(self) -> None:
        try:
            self._run()
        except BaseException as error:  # noqa: B036  (kept for wait())
            self._error = error
        finally:
            atexit.unregister(self._stop_at_exit)

    def _stop_at_exit(self) -> None:
        """At interpreter exit no training job of this tuning job is left running."""
        if self._thread is not None and self._thread.is_alive():
            self.stop()
            self._thread.join()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as error:
            interrupted = isinstance(error, KeyboardInterrupt)
            self._stop_running("the tuning job was interrupted" if interrupted
                               else "the tuning job failed")
            with self._lock:
                self.status = "Stopped" if interrupted else "Failed"
                if not interrupted and self.failure_reason is None:
                    self.failure_reason = (error.reason if isinstance(error, TuningJobError)
                                           else f"{type(error).__name__}: {error}")
                self._finished()
            raise
        with self._lock:
            self._finished()

    def _finished(self) -> None:
        self.end_time = self.last_modified = _now()
        self._write_record()
        logger.info("tuning job %s %s", self.name, self.status.lower())

    def _loop(self) -> None:
        while True:
            changed = False
            for trial in self._running():
                changed |= self._poll(trial)
            if self._stop_requested.is_set():
                with self._lock:
                    self.status = "Stopping"
                self._write_record()
                self._stop_running("the tuning job was stopped")
                with self._lock:
                    self.status = "Stopped"
                return
            while len(self._running()) < self.tuner.max_parallel_jobs and \
                    len(self.trials) < self.max_jobs:
                self._start_trial()
                changed = True
            if changed:
                self._write_record()
            if not self._running() and len(self.trials) >= self.max_jobs:
                break
            time.sleep(POLL_SECONDS)
        with self._lock:
            if not any(t.status == "Completed" for t in self.trials):
                failed = [t for t in self.trials if t.status == "Failed"]
                self.status = "Failed"
                self.failure_reason = f"none of the {len(self.trials)} training jobs completed"
                if failed:
                    self.failure_reason += f"; the first failure: {failed[0].failure_reason}"
            else:
                self.status = "Completed"

    def _running(self) -> list[_Trial]:
        with self._lock:
            return [t for t in self.trials if t.status == "InProgress"]

    def _start_trial(self) -> None:
        import optuna

        tuner = self.tuner
        assert self._study is not None
        number = len(self.trials) + 1
        if self._grid:
            self._study.enqueue_trial(self._grid[number - 1])
        optuna_trial = self._study.ask(tuner._distributions())
        values = {name: tuner._hyperparameter_ranges[name].from_sample(sample)
                  for name, sample in optuna_trial.params.items()}
        name = f"{self.name}-{number:03d}-{secrets.token_hex(4)}"
        estimator = tuner._trial_estimator(values)
        trial = _Trial(number=number, name=name, hyperparameters=values,
                       optuna_trial=optuna_trial, estimator=estimator,
                       job_dir=str(estimator.jobs_dir / name))
        with self._lock:
            self.trials.append(trial)
            self.last_modified = _now()
        try:
            estimator.fit(self.inputs, wait=False, logs=False, job_name=name)
        except Exception as error:
            with self._lock:
                trial.status = "Failed"
                trial.failure_reason = f"{type(error).__name__}: {error}"
                trial.end_time = _now()
            self._study.tell(optuna_trial, state=optuna.trial.TrialState.FAIL)
            raise TuningJobError(self.name, f"training job {name} could not start: "
                                 f"{trial.failure_reason}") from error
        trial.job = estimator.latest_training_job
        trial.start_time = _now()
        logger.info("tuning job %s: started %s with %s", self.name, name, values)

    def _poll(self, trial: _Trial) -> bool:
        """Read the job's new output; settle it if it ended or should stop early."""
        import optuna

        job = trial.job
        assert job is not None and job.process is not None and self._study is not None
        running = job.process.poll() is None
        # Only whole lines while the job runs, so that a line being written is not cut.
        lines, end = self._new_lines(trial, whole_lines_only=running)
        prune: tuple[int, float] | None = None  # the step and value that stop it
        pruning = running and self.tuner._prunes
        for line in lines:
            for step, value in self._record(trial, line):
                # Once it is to stop, the rest of the lines are still read and reported.
                if pruning and prune is None and trial.optuna_trial.should_prune():
                    prune = (step, value)
        if prune is not None:
            job.stop()
            if job.status == "Stopped":
                with self._lock:
                    trial.status = "Stopped"
                    trial.early_stopped = True
                    trial.final_objective = trial.objective[-1]
                    rule = ("by Hyperband" if self.tuner.strategy == "Hyperband"
                            else "as worse than the median of the completed jobs")
                    trial.failure_reason = (
                        f"stopped early {rule}: its {self._objective_name} was "
                        f"{prune[1]:g} at step {prune[0]}")
                    trial.end_time = self.last_modified = _now()
                self._study.tell(trial.optuna_trial, state=optuna.trial.TrialState.PRUNED)
                logger.info("tuning job %s: %s %s", self.name, trial.name,
                            trial.failure_reason)
                return True
            running = False  # it ended before the signal: settle it as it ended
            self._drain(trial)
        if running:
            return end > 0
        self._settle(trial)
        return True

    def _drain(self, trial: _Trial) -> None:
        """Read what is left of the log of a job that ended (values are still reported)."""
        lines, _ = self._new_lines(trial, whole_lines_only=False)
        for line in lines:
            self._record(trial, line)

    def _new_lines(self, trial: _Trial, whole_lines_only: bool) -> tuple[list[str], int]:
        """The job's log lines since the last read, and how many bytes they took."""
        assert trial.job is not None
        try:
            with open(trial.job.log_path, "rb") as log:
                log.seek(trial.log_offset)
                chunk = log.read()
        except OSError:
            chunk = b""
        end = chunk.rfind(b"\n") + 1 if whole_lines_only else len(chunk)
        trial.log_offset += end
        return chunk[:end].decode(errors="replace").splitlines(), end

    def _record(self, trial: _Trial, line: str) -> list[tuple[int, float]]:
        """Keep one log line's metrics; report its objective values to Optuna (step, value)."""
        reported = []
        for metric, value in line_metrics(line, self.tuner._compiled_metrics):
            with self._lock:
                trial.metrics[metric] = value
                if metric != self._objective_name:
                    continue
                step = len(trial.objective)
                trial.objective.append(value)
            trial.optuna_trial.report(value, step)
            reported.append((step, value))
        return reported

    def _settle(self, trial: _Trial) -> None:
        import optuna

        assert trial.job is not None and self._study is not None
        status = trial.job.describe()["TrainingJobStatus"]
        state = optuna.trial.TrialState.FAIL
        with self._lock:
            trial.end_time = self.last_modified = _now()
            if status != "Completed":
                trial.status = "Failed" if status != "Stopped" else "Stopped"
                trial.failure_reason = trial.job.failure_reason or f"the job ended {status}"
            elif not trial.objective:
                trial.status = "Failed"
                trial.failure_reason = (
                    f"the job completed but printed no {self._objective_name} (no line of "
                    f"{trial.job.log_path} matches its regex "
                    f"{self.tuner._objective_regex!r})")
            elif math.isnan(trial.objective[-1]):
                trial.status = "Failed"
                trial.failure_reason = f"the last {self._objective_name} it printed is NaN"
            else:
                trial.status = "Completed"
                trial.final_objective = trial.objective[-1]
                state = optuna.trial.TrialState.COMPLETE
        if state == optuna.trial.TrialState.COMPLETE:
            self._study.tell(trial.optuna_trial, trial.final_objective)
            logger.info("tuning job %s: %s completed, %s = %g", self.name, trial.name,
                        self._objective_name, trial.final_objective)
        else:
            self._study.tell(trial.optuna_trial, state=state)
            logger.warning("tuning job %s: training job %s failed: %s", self.name, trial.name,
                           trial.failure_reason)

    def _stop_running(self, reason: str) -> None:
        """Stop every running job, all at once (each has its grace period)."""
        import optuna

        running = self._running()
        stoppers = [threading.Thread(target=t.job.stop) for t in running if t.job is not None]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()
        for trial in running:
            if trial.job is None:
                continue
            status = trial.job.describe()["TrainingJobStatus"]
            if status != "Stopped":
                self._drain(trial)
                self._settle(trial)
                continue
            with self._lock:
                trial.status = "Stopped"
                trial.failure_reason = reason
                trial.end_time = self.last_modified = _now()
            if self._study is not None:
                self._study.tell(trial.optuna_trial, state=optuna.trial.TrialState.FAIL)

    def _summary(self, trial: _Trial) -> dict[str, Any]:
        return trial.summary(self.name, self._objective_type, self._objective_name)

    def record(self) -> dict[str, Any]:
        """What ``tuning.json`` holds: :meth:`describe` and every job's summary."""
        with self._lock:
            record = self.describe()
            record["TrainingJobSummaries"] = self.training_job_summaries()
            record["JobsDir"] = str(self.jobs_dir)
            return record

    def _write_record(self) -> None:
        text = json.dumps(self.record(), indent=2, default=_json_default)
        scratch = self.record_path.with_name(f".{RECORD}.{os.getpid()}.tmp")
        scratch.write_text(text + "\n")
        os.replace(scratch, self.record_path)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def read_record(tuning_job_name: str, jobs_dir: str | os.PathLike[str] | None = None
                ) -> dict[str, Any]:
    """The ``tuning.json`` of ``tuning_job_name`` in ``jobs_dir`` (``./jobs``), times parsed."""
    folder = (local_path(jobs_dir) if jobs_dir is not None else Path.cwd() / "jobs").resolve()
    path = folder / tuning_job_name / RECORD
    try:
        return _parse_times(json.loads(path.read_text()))
    except FileNotFoundError:
        raise SmchainerError(f"no tuning job {tuning_job_name!r} in {folder} ({path} does not "
                             "exist)") from None
    except ValueError as error:
        raise SmchainerError(f"{path} cannot be read: {error}") from None


class HyperparameterTuner:
    """Tune an estimator's hyperparameters with local training jobs (see the module docstring).

    :param estimator: the :class:`~smchainer.api.estimator.Estimator` whose settings
        every training job has.
    :param objective_metric_name: the metric to maximize or minimize.
    :param hyperparameter_ranges: name -> :class:`ContinuousParameter`,
        :class:`IntegerParameter` or :class:`CategoricalParameter`.
    :param metric_definitions: ``[{"Name": ..., "Regex": ...}]``; default the
        estimator's ``metric_definitions``. One must define the objective.
    :param strategy: ``Bayesian`` (TPE), ``Random``, ``Grid`` or ``Hyperband``.
    :param objective_type: ``Maximize`` or ``Minimize``.
    :param max_jobs: training jobs in all (default 1; for ``Grid``, every combination).
    :param max_parallel_jobs: training jobs at a time, on this machine.
    :param early_stopping_type: ``Off`` or ``Auto`` (median stopping).
    :param random_seed: the sampler's seed: with one job at a time, the same
        seed tries the same hyperparameters.
    :param strategy_config: ``Hyperband`` only: its ``MinResource``/``MaxResource``.
    :param optuna_verbosity: the level Optuna's own logger is set to (default
        WARNING); None leaves it as it is.
    """

    def __init__(self, estimator: Estimator, objective_metric_name: str,
                 hyperparameter_ranges: Mapping[str, Range],
                 metric_definitions: list[dict[str, str]] | None = None,
                 strategy: str = "Bayesian", objective_type: str = "Maximize",
                 max_jobs: int | None = None, max_parallel_jobs: int = 1,
                 tags: Any = None, base_tuning_job_name: str | None = None,
                 early_stopping_type: str = "Off", random_seed: int | None = None,
                 strategy_config: Any = None, *,
                 optuna_verbosity: int | None = logging.WARNING, **aws_only: Any) -> None:
        if not isinstance(estimator, Estimator):
            raise TypeError(f"estimator must be an smchainer Estimator (Chainer), not "
                            f"{type(estimator).__name__}")
        self.strategy = _choice("strategy", strategy, STRATEGIES)
        if strategy_config is not None and self.strategy != "Hyperband":
            aws_only["strategy_config"] = strategy_config
        if tags is not None:
            aws_only["tags"] = tags
        warn_ignored(aws_only, type(self).__name__)
        self.estimator = estimator
        if not isinstance(objective_metric_name, str) or not objective_metric_name:
            raise ValueError(f"objective_metric_name must be a metric's name, not "
                             f"{objective_metric_name!r}")
        self.objective_metric_name = objective_metric_name
        self.objective_type = _choice("objective_type", objective_type, OBJECTIVE_TYPES)
        self.early_stopping_type = _choice("early_stopping_type", early_stopping_type,
                                           EARLY_STOPPING_TYPES)
        if self.strategy == "Hyperband" and self.early_stopping_type == "Auto":
            raise ValueError("strategy 'Hyperband' stops jobs early itself: "
                             "early_stopping_type must be 'Off' with it (as on SageMaker)")
        self._hyperband = (_hyperband_resources(strategy_config)
                           if self.strategy == "Hyperband" else None)
        self.strategy_config = strategy_config if self.strategy == "Hyperband" else None
        self._hyperparameter_ranges = self._check_ranges(hyperparameter_ranges)
        if metric_definitions is None:
            metric_definitions = getattr(estimator, "metric_definitions", None)
        if not metric_definitions:
            raise ValueError(f"metric_definitions are needed to read the objective metric "
                             f"{objective_metric_name!r} from the jobs' logs: give "
                             "[{'Name': ..., 'Regex': ...}] here or to the estimator")
        self._compiled_metrics = compile_definitions(metric_definitions)
        self.metric_definitions = [dict(d) for d in metric_definitions]
        objective = [pattern for name, pattern in self._compiled_metrics
                     if name == objective_metric_name]
        if not objective:
            names = ", ".join(repr(name) for name, _ in self._compiled_metrics)
            raise ValueError(f"objective metric {objective_metric_name!r} has no definition "
                             f"in metric_definitions (they define {names})")
        self._objective_regex = objective[0].pattern
        if max_jobs is not None:
            max_jobs = positive_int("max_jobs", max_jobs)
        self.max_jobs = max_jobs
        self.max_parallel_jobs = positive_int("max_parallel_jobs", max_parallel_jobs) or 1
        if random_seed is not None and (isinstance(random_seed, bool)
                                        or not isinstance(random_seed, int)):
            raise ValueError(f"random_seed must be a whole number, not {random_seed!r}")
        self.random_seed = random_seed
        self.tags = tags
        self.base_tuning_job_name = base_tuning_job_name
        self.optuna_verbosity = optuna_verbosity
        if self.strategy == "Grid":
            self._grid_size()  # refuses continuous ranges now
        self.latest_tuning_job: TuningJob | None = None
        self._jobs_dir = Path(estimator.jobs_dir)
        self._estimator_cls: type[Estimator] = type(estimator)
        self._deployed: Estimator | None = None

    # -- configuration

    def _check_ranges(self, ranges: Any) -> dict[str, Range]:
        if not isinstance(ranges, Mapping) or not ranges:
            raise ValueError("hyperparameter_ranges must name at least one hyperparameter: "
                             "{'lr': ContinuousParameter(0.001, 0.1), ...}")
        checked: dict[str, Range] = {}
        for name, value in ranges.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"hyperparameter name {name!r} must be a non-empty string")
            if not isinstance(value, (ParameterRange, CategoricalParameter)):
                raise ValueError(f"hyperparameter {name!r}: give a ContinuousParameter, "
                                 f"IntegerParameter or CategoricalParameter, not {value!r}")
            value.check(name)
            checked[name] = value
        return checked

    def hyperparameter_ranges(self) -> dict[str, list[dict[str, Any]]]:
        """The ranges as ``CreateHyperParameterTuningJob``'s ``ParameterRanges``."""
        ranges: dict[str, list[dict[str, Any]]] = {
            "ContinuousParameterRanges": [], "IntegerParameterRanges": [],
            "CategoricalParameterRanges": []}
        for name, value in self._hyperparameter_ranges.items():
            ranges[f"{value.__name__}ParameterRanges"].append(value.as_tuning_range(name))
        return ranges

    @property
    def jobs_dir(self) -> Path:
        """The folder of the training jobs and of the tuning job's record (the estimator's)."""
        return Path(self.estimator.jobs_dir) if self.estimator is not None else self._jobs_dir

    def _static_hyperparameters(self) -> dict[str, Any]:
        return {key: value for key, value in self.estimator.hyperparameters_dict.items()
                if key not in self._hyperparameter_ranges}

    def _job_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "Strategy": self.strategy,
            "HyperParameterTuningJobObjective": {"Type": self.objective_type,
                                                 "MetricName": self.objective_metric_name},
            "ResourceLimits": {"MaxNumberOfTrainingJobs": self._planned_jobs(),
                               "MaxParallelTrainingJobs": self.max_parallel_jobs},
            "ParameterRanges": self.hyperparameter_ranges(),
            "TrainingJobEarlyStoppingType": self.early_stopping_type,
        }
        if self.random_seed is not None:
            config["RandomSeed"] = self.random_seed
        if self._hyperband is not None:
            low, high = self._hyperband
            config["StrategyConfig"] = {"HyperbandStrategyConfig": {
                "MinResource": low, **({"MaxResource": high} if high != "auto" else {})}}
        return {
            "HyperParameterTuningJobConfig": config,
            "TrainingJobDefinition": {
                "StaticHyperParameters": self._static_hyperparameters(),
                "AlgorithmSpecification": {"MetricDefinitions": self.metric_definitions},
            },
        }

    def _grid_size(self) -> int:
        size = 1
        for name, value in self._hyperparameter_ranges.items():
            size *= len(value.grid_values(name))
        return size

    def _planned_jobs(self) -> int:
        if self.strategy == "Grid":
            size = self._grid_size()
            return size if self.max_jobs is None else min(self.max_jobs, size)
        return self.max_jobs or 1

    def _grid_combinations(self, count: int) -> list[dict[str, Any]]:
        """Every combination in order (the first range varies slowest), or ``count`` of them."""
        names = list(self._hyperparameter_ranges)
        values = [self._hyperparameter_ranges[name].grid_values(name) for name in names]
        combinations = [dict(zip(names, combination, strict=True))
                        for combination in itertools.product(*values)]
        if count < len(combinations):
            chosen = sorted(random.Random(self.random_seed).sample(range(len(combinations)),
                                                                   count))
            logger.info("Grid: max_jobs=%d runs %d of the %d combinations, chosen at random",
                        count, count, len(combinations))
            combinations = [combinations[i] for i in chosen]
        return combinations

    def _distributions(self) -> dict[str, Any]:
        return {name: value.distribution(name)
                for name, value in self._hyperparameter_ranges.items()}

    @property
    def _prunes(self) -> bool:
        return self.early_stopping_type == "Auto" or self.strategy == "Hyperband"

    def _create_study(self) -> optuna.Study:
        import optuna

        if self.optuna_verbosity is not None:
            optuna.logging.set_verbosity(self.optuna_verbosity)
        seed = self.random_seed
        sampler: optuna.samplers.BaseSampler
        if self.strategy == "Bayesian":
            # Random picks first: half of the jobs, from 2 to TPE's usual 10.
            startup = min(10, max(2, self._planned_jobs() // 2))
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
        else:  # Random, Hyperband; Grid enqueues each combination itself
            sampler = optuna.samplers.RandomSampler(seed=seed)
        pruner: optuna.pruners.BasePruner
        if self.strategy == "Hyperband":
            assert self._hyperband is not None
            low, high = self._hyperband
            pruner = optuna.pruners.HyperbandPruner(min_resource=low, max_resource=high)
        elif self.early_stopping_type == "Auto":
            pruner = optuna.pruners.MedianPruner(n_startup_trials=EARLY_STOPPING_STARTUP_TRIALS,
                                                 n_warmup_steps=EARLY_STOPPING_WARMUP_STEPS)
        else:
            pruner = optuna.pruners.NopPruner()
        direction = (optuna.study.StudyDirection.MAXIMIZE if self.objective_type == "Maximize"
                     else optuna.study.StudyDirection.MINIMIZE)
        return optuna.create_study(sampler=sampler, pruner=pruner, direction=direction)

    def _trial_threads(self) -> int:
        """``OMP_NUM_THREADS`` of each job: this machine's CPUs shared by the parallel jobs."""
        from smchainer.device import cpu_count

        ranks = 1
        if getattr(self.estimator, "hostfile", None) is None:
            try:
                ranks = self.estimator.processes() or 1
            except Exception:  # e.g. local_gpu without a GPU: fit() says so
                ranks = 1
        return max(1, cpu_count() // (self.max_parallel_jobs * ranks))

    def _trial_estimator(self, values: Mapping[str, Any]) -> Estimator:
        """A copy of the estimator with the job's hyperparameters over the static ones.

        A shallow copy keeps every setting, those of a subclass and those added
        later included; what a job changes (hyperparameters, environment, its
        latest job and endpoint) is replaced, so the copies share none of it.
        """
        estimator = copy.copy(self.estimator)
        estimator.hyperparameters_dict = {**self._static_hyperparameters(), **values}
        environment = dict(self.estimator.environment)
        if "OMP_NUM_THREADS" not in environment and "OMP_NUM_THREADS" not in os.environ:
            environment["OMP_NUM_THREADS"] = str(self._trial_threads())
        estimator.environment = environment
        estimator.latest_training_job = None
        if hasattr(estimator, "_endpoint_name"):
            estimator._endpoint_name = None
        return estimator

    # -- the SDK's calls

    def fit(self, inputs: Any = None, job_name: str | None = None, wait: bool = True,
            **aws_only: Any) -> None:
        """Start a tuning job.

        :param inputs: the channels of every training job, as for ``Estimator.fit``.
        :param job_name: the tuning job's name (default ``<base>-yymmdd-HHMM``, at
            most 32 characters as on SageMaker).
        :param wait: wait for it (else see :meth:`wait`); a failed tuning job then
            raises :class:`TuningJobError`.
        """
        warn_ignored(aws_only, "fit")
        if self.estimator is None:
            raise SmchainerError("this tuner was attached without an estimator: it can "
                                 "describe its tuning job but not run another")
        running = self.latest_tuning_job
        if running is not None and running.status in ("InProgress", "Stopping"):
            raise SmchainerError(f"tuning job {running.name} is still running: wait() or "
                                 "stop_tuning_job() first")
        jobs_dir = self.jobs_dir
        if job_name is not None:
            if len(job_name) > TUNING_JOB_NAME_LIMIT or not _TUNING_JOB_NAME.match(job_name):
                raise ValueError(f"tuning job name {job_name!r}: at most 32 letters, digits "
                                 "and hyphens, starting and ending with a letter or digit")
            if (jobs_dir / job_name).exists():
                raise ValueError(f"tuning job name {job_name!r} is taken: {jobs_dir / job_name} "
                                 "exists")
            name = job_name
        else:
            name = _tuning_job_name(self.base_tuning_job_name or DEFAULT_BASE_JOB_NAME,
                                    jobs_dir)
        self.latest_tuning_job = TuningJob(self, name, inputs)
        self.latest_tuning_job.start(wait=wait)

    def _current_job(self) -> TuningJob:
        if self.latest_tuning_job is None:
            raise SmchainerError("no tuning job yet: call fit() first")
        return self.latest_tuning_job

    def wait(self) -> None:
        """Wait for the latest tuning job; raise :class:`TuningJobError` if it failed."""
        self._current_job().wait()

    def stop_tuning_job(self) -> None:
        """Stop the latest tuning job (its running training jobs too); :meth:`wait` for it."""
        self._current_job().stop()

    def describe(self) -> dict[str, Any]:
        """The latest tuning job as ``DescribeHyperParameterTuningJob`` describes it."""
        return self._current_job().describe()

    def best_training_job(self) -> str:
        """The name of the completed training job with the best objective."""
        return self._current_job().best_training_job()

    def best_estimator(self, best_training_job: str | None = None) -> Estimator:
        """An estimator attached to the best training job (``Estimator.attach``)."""
        name = best_training_job or self.best_training_job()
        session = getattr(self.estimator, "sagemaker_session", None)
        return self._estimator_cls.attach(name, sagemaker_session=session,
                                          jobs_dir=self.jobs_dir)

    def analytics(self) -> HyperparameterTuningJobAnalytics:
        """The latest tuning job's analytics (``analytics().dataframe()``: one row per job)."""
        job = self._current_job()
        return HyperparameterTuningJobAnalytics(job.name, jobs_dir=self.jobs_dir)

    def deploy(self, initial_instance_count: int = 1, instance_type: str = "local",
               serializer: Any = None, deserializer: Any = None,
               endpoint_name: str | None = None, wait: bool = True, **kwargs: Any) -> Any:
        """Serve the best training job's model; see ``Estimator.deploy``."""
        estimator = self.best_estimator()
        predictor = estimator.deploy(initial_instance_count=initial_instance_count,
                                     instance_type=instance_type, serializer=serializer,
                                     deserializer=deserializer, endpoint_name=endpoint_name,
                                     wait=wait, **kwargs)
        self._deployed = estimator
        return predictor

    def delete_endpoint(self, endpoint_name: str | None = None) -> None:
        """Stop the endpoint :meth:`deploy` started (SDK v1's call)."""
        if self._deployed is None:
            raise SmchainerError("no endpoint to delete: deploy() starts one")
        self._deployed.delete_endpoint()
        self._deployed = None

    @classmethod
    def attach(cls, tuning_job_name: str, sagemaker_session: Session | None = None,
               job_details: Any = None, estimator_cls: type[Estimator] | None = None,
               jobs_dir: str | os.PathLike[str] | None = None,
               **aws_only: Any) -> HyperparameterTuner:
        """A tuner of the tuning job ``tuning_job_name`` in ``jobs_dir`` (``./jobs``).

        Read from its ``tuning.json``: :meth:`describe`, :meth:`best_training_job`,
        :meth:`analytics`, :meth:`best_estimator` and :meth:`deploy` work as
        after its ``fit()``. Its estimator is attached to the best job (None
        when no job completed).
        """
        if job_details is not None:
            aws_only["job_details"] = job_details
        warn_ignored(aws_only, "attach")
        folder = (local_path(jobs_dir) if jobs_dir is not None else Path.cwd() / "jobs").resolve()
        record = read_record(tuning_job_name, folder)
        job = TuningJob.from_record(record, folder)
        config = job.config["HyperParameterTuningJobConfig"]
        tuner = cls.__new__(cls)
        tuner._estimator_cls = estimator_cls or Chainer
        tuner._jobs_dir = folder
        tuner.strategy = config["Strategy"]
        tuner.objective_type = config["HyperParameterTuningJobObjective"]["Type"]
        tuner.objective_metric_name = config["HyperParameterTuningJobObjective"]["MetricName"]
        tuner.early_stopping_type = config.get("TrainingJobEarlyStoppingType", "Off")
        tuner.random_seed = config.get("RandomSeed")
        tuner.max_jobs = config["ResourceLimits"]["MaxNumberOfTrainingJobs"]
        tuner.max_parallel_jobs = config["ResourceLimits"]["MaxParallelTrainingJobs"]
        tuner._hyperparameter_ranges = {
            entry["Name"]: _range_from_record(kind, entry)
            for kind in ("Continuous", "Integer", "Categorical")
            for entry in config["ParameterRanges"].get(f"{kind}ParameterRanges", [])}
        hyperband = config.get("StrategyConfig", {}).get("HyperbandStrategyConfig") or {}
        tuner._hyperband = ((hyperband.get("MinResource", 1), hyperband.get("MaxResource", "auto"))
                            if tuner.strategy == "Hyperband" else None)
        tuner.strategy_config = config.get("StrategyConfig")
        tuner.metric_definitions = job.config["TrainingJobDefinition"][
            "AlgorithmSpecification"]["MetricDefinitions"]
        tuner._compiled_metrics = compile_definitions(tuner.metric_definitions)
        tuner._objective_regex = next(pattern.pattern for name, pattern
                                      in tuner._compiled_metrics
                                      if name == tuner.objective_metric_name)
        tuner.tags = None
        tuner.base_tuning_job_name = None
        tuner.optuna_verbosity = logging.WARNING
        tuner.latest_tuning_job = job
        tuner._deployed = None
        tuner.estimator = None  # type: ignore[assignment]
        best = job.best_trial()
        if best is not None:
            tuner.estimator = tuner._estimator_cls.attach(
                best.name, sagemaker_session=sagemaker_session, jobs_dir=folder)
        return tuner


class HyperparameterTuningJobAnalytics:
    """The SDK's tuning analytics, read from the tuning job's ``tuning.json``.

    :param hyperparameter_tuning_job_name: the tuning job.
    :param jobs_dir: its jobs folder (default ``./jobs``).
    """

    def __init__(self, hyperparameter_tuning_job_name: str, sagemaker_session: Any = None,
                 jobs_dir: str | os.PathLike[str] | None = None, **aws_only: Any) -> None:
        warn_ignored(aws_only, type(self).__name__)
        self.name = hyperparameter_tuning_job_name
        self._jobs_dir = jobs_dir
        self._record: dict[str, Any] | None = None
        self._rows: list[dict[str, Any]] | None = None

    def clear_cache(self) -> None:
        """Forget what was read, so that the next call reads the record again."""
        self._record = None
        self._rows = None

    def _read(self, force_refresh: bool = False) -> dict[str, Any]:
        if force_refresh:
            self.clear_cache()
        if self._record is None:
            self._record = read_record(self.name, self._jobs_dir)
        return self._record

    def description(self, force_refresh: bool = False) -> dict[str, Any]:
        """The tuning job, as :meth:`HyperparameterTuner.describe` gives it."""
        record = dict(self._read(force_refresh))
        record.pop("TrainingJobSummaries", None)
        record.pop("JobsDir", None)
        return record

    def training_job_summaries(self, force_refresh: bool = False) -> list[dict[str, Any]]:
        """One summary per training job, in the order they started."""
        return list(self._read(force_refresh).get("TrainingJobSummaries", []))

    @property
    def tuning_ranges(self) -> dict[str, dict[str, Any]]:
        """Hyperparameter name -> its range, as the tuning job's config has it."""
        ranges = self._read()["HyperParameterTuningJobConfig"]["ParameterRanges"]
        return {entry["Name"]: entry for entries in ranges.values() for entry in entries}

    def rows(self, force_refresh: bool = False) -> list[dict[str, Any]]:
        """The rows of :meth:`dataframe`, as dicts."""
        if force_refresh:
            self.clear_cache()
        if self._rows is None:
            rows = []
            for summary in self.training_job_summaries():
                row = dict(summary.get("TunedHyperParameters", {}))
                row["TrainingJobName"] = summary["TrainingJobName"]
                row["TrainingJobStatus"] = summary["TrainingJobStatus"]
                final = summary.get("FinalHyperParameterTuningJobObjectiveMetric") or {}
                row["FinalObjectiveValue"] = final.get("Value")
                start = summary.get("TrainingStartTime")
                end = summary.get("TrainingEndTime")
                row["TrainingStartTime"] = start
                row["TrainingEndTime"] = end
                if start is not None and end is not None:
                    row["TrainingElapsedTimeSeconds"] = (end - start).total_seconds()
                rows.append(row)
            self._rows = rows
        return [dict(row) for row in self._rows]

    def dataframe(self, force_refresh: bool = False) -> Any:
        """One row per training job: a pandas DataFrame, or a list of dicts without pandas.

        Columns as the SDK's: each tuned hyperparameter, ``TrainingJobName``,
        ``TrainingJobStatus``, ``FinalObjectiveValue``, ``TrainingStartTime``,
        ``TrainingEndTime``, ``TrainingElapsedTimeSeconds``.
        """
        rows = self.rows(force_refresh)
        try:
            import pandas
        except ImportError:
            return rows
        return pandas.DataFrame(rows)

    def export_csv(self, filename: str | os.PathLike[str], force_refresh: bool = False) -> None:
        """Write :meth:`dataframe`'s rows to a CSV file."""
        rows = self.rows(force_refresh)
        columns: list[str] = []
        for row in rows:
            columns += [key for key in row if key not in columns]
        with open(filename, "w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
