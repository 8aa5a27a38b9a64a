"""HyperparameterTuner: real training jobs of a stand-in script, tuned with Optuna."""
from __future__ import annotations

import itertools
import json
import re
import statistics
import sys
import time
import types

import numpy as np
import pytest

from smchainer.api import Chainer, IgnoredArgumentWarning
from smchainer.api.parameter import CategoricalParameter, ContinuousParameter, IntegerParameter
from smchainer.api.tuner import (
    HyperparameterTuner,
    HyperparameterTuningJobAnalytics,
    TuningJobError,
    metric_values,
)
from smchainer.device import cpu_count, gpu_count
from smchainer.errors import SmchainerError
from tests.api.conftest import alive
from tests.tuning.conftest import METRICS, load_script, logged_values

ACCURACY = "validation-accuracy"
LOSS = "validation-loss"


def estimator(source_dir, jobs_dir, **hyperparameters):
    return Chainer(entry_point="train.py", source_dir=str(source_dir),
                   hyperparameters={"epochs": 3, **hyperparameters}, instance_type="local",
                   jobs_dir=jobs_dir)


def summaries(tuner):
    return {s["TrainingJobName"]: s for s in tuner.latest_tuning_job.training_job_summaries()}


def job_dir(tuner, name):
    return tuner.jobs_dir / name


@pytest.fixture(scope="module")
def tuned(source_dir, tmp_path_factory):
    """Four jobs, two at a time, of a Bayesian (TPE) search over lr and layers."""
    jobs = tmp_path_factory.mktemp("jobs")
    tuner = HyperparameterTuner(
        estimator(source_dir, jobs, sleep=0.2, activation="tanh"), ACCURACY,
        {"lr": ContinuousParameter(1e-4, 1.0, "Logarithmic"), "layers": IntegerParameter(1, 4)},
        metric_definitions=METRICS, max_jobs=4, max_parallel_jobs=2, random_seed=3)
    tuner.fit()
    return tuner


def test_best_job_is_the_best_final_metric_of_the_logs(tuned, source_dir):
    script = load_script(source_dir / "train.py")
    jobs = summaries(tuned)
    assert len(jobs) == 4
    finals = {}
    for name, summary in jobs.items():
        assert summary["TrainingJobStatus"] == "Completed"
        values = summary["TunedHyperParameters"]
        assert set(values) == {"lr", "layers"}
        # What the job got: the tuned values over the estimator's own hyperparameters.
        given = json.loads((job_dir(tuned, name) / "input" / "config" /
                            "hyperparameters.json").read_text())
        assert {k: json.loads(v) for k, v in given.items()} == {
            "epochs": 3, "sleep": 0.2, "activation": "tanh", **values}
        logged = logged_values(job_dir(tuned, name), ACCURACY)
        assert len(logged) == 3
        finals[name] = logged[-1]
        expected = script.score(values["lr"], values["layers"], "tanh")
        assert abs(logged[-1] - expected) < 1e-6
        final = summary["FinalHyperParameterTuningJobObjectiveMetric"]
        assert final == {"Type": "Maximize", "MetricName": ACCURACY, "Value": logged[-1]}
        assert summary["ObjectiveMetricValues"] == logged
        assert summary["FinalMetricValues"][LOSS] == logged_values(job_dir(tuned, name),
                                                                   LOSS)[-1]
    best = tuned.best_training_job()
    assert finals[best] == max(finals.values())
    described = tuned.describe()
    assert described["HyperParameterTuningJobStatus"] == "Completed"
    assert described["BestTrainingJob"]["TrainingJobName"] == best
    assert described["TrainingJobStatusCounters"] == {
        "Completed": 4, "InProgress": 0, "RetryableError": 0, "NonRetryableError": 0,
        "Stopped": 0}
    assert described["ObjectiveStatusCounters"] == {"Succeeded": 4, "Pending": 0, "Failed": 0}
    config = described["HyperParameterTuningJobConfig"]
    assert config["Strategy"] == "Bayesian" and config["RandomSeed"] == 3
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 4,
                                        "MaxParallelTrainingJobs": 2}
    assert config["ParameterRanges"]["ContinuousParameterRanges"] == [
        {"Name": "lr", "MinValue": "0.0001", "MaxValue": "1.0", "ScalingType": "Logarithmic"}]
    assert described["TrainingJobDefinition"]["StaticHyperParameters"] == {
        "epochs": 3, "sleep": 0.2, "activation": "tanh"}


def test_jobs_are_named_as_sagemaker_names_them_and_share_the_cores(tuned):
    name = tuned.latest_tuning_job.name
    assert re.fullmatch(r"smchainer-chainer-\d{6}-\d{4}", name) and len(name) <= 32
    numbers = []
    for job in summaries(tuned):
        match = re.fullmatch(rf"{name}-(\d{{3}})-[0-9a-f]{{8}}", job)
        assert match and len(job) <= 63
        numbers.append(int(match.group(1)))
        threads = re.search(r"^threads (\S+)$", (job_dir(tuned, job) / "train.log").read_text(),
                            re.MULTILINE)
        assert threads and threads.group(1) == str(max(1, cpu_count() // 2))
    assert sorted(numbers) == [1, 2, 3, 4]
    # Two at a time: never three jobs running together, and two did run together.
    spans = [(s["TrainingStartTime"], s["TrainingEndTime"]) for s in summaries(tuned).values()]
    running = [sum(start <= t < end for start, end in spans) for t, _ in spans]
    assert max(running) == 2


def test_the_record_on_disk_and_attach(tuned):
    job = tuned.latest_tuning_job
    record = json.loads((tuned.jobs_dir / job.name / "tuning.json").read_text())
    assert record["HyperParameterTuningJobStatus"] == "Completed"
    assert [s["TrainingJobName"] for s in record["TrainingJobSummaries"]] == list(summaries(tuned))
    assert {s["TrainingJobStatus"] for s in record["TrainingJobSummaries"]} == {"Completed"}
    attached = HyperparameterTuner.attach(job.name, jobs_dir=tuned.jobs_dir)
    assert attached.best_training_job() == tuned.best_training_job()
    assert attached.describe()["ObjectiveStatusCounters"]["Succeeded"] == 4
    assert attached.hyperparameter_ranges() == tuned.hyperparameter_ranges()
    assert attached.analytics().rows() == tuned.analytics().rows()
    best = attached.best_estimator()
    assert best.latest_training_job.name == tuned.best_training_job()
    assert best.model_data.endswith("model.tar.gz")
    with pytest.raises(SmchainerError, match="no tuning job 'missing'"):
        HyperparameterTuner.attach("missing", jobs_dir=tuned.jobs_dir)


def test_analytics_rows_have_the_sdk_columns(tuned, monkeypatch):
    analytics = tuned.analytics()
    rows = analytics.dataframe()
    if not isinstance(rows, list):  # pandas is installed
        rows = rows.to_dict("records")
    assert len(rows) == 4
    by_name = summaries(tuned)
    for row in rows:
        assert set(row) == {"lr", "layers", "TrainingJobName", "TrainingJobStatus",
                            "FinalObjectiveValue", "TrainingStartTime", "TrainingEndTime",
                            "TrainingElapsedTimeSeconds"}
        summary = by_name[row["TrainingJobName"]]
        assert row["lr"] == summary["TunedHyperParameters"]["lr"]
        assert row["FinalObjectiveValue"] == logged_values(
            job_dir(tuned, row["TrainingJobName"]), ACCURACY)[-1]
        assert row["TrainingJobStatus"] == "Completed"
        assert 0.5 < row["TrainingElapsedTimeSeconds"] < 60
        assert row["TrainingEndTime"] > row["TrainingStartTime"]
    assert set(analytics.tuning_ranges) == {"lr", "layers"}
    # With pandas, a DataFrame of the same rows.
    fake = types.ModuleType("pandas")
    fake.DataFrame = lambda rows: ("frame", rows)
    monkeypatch.setitem(sys.modules, "pandas", fake)
    kind, framed = HyperparameterTuningJobAnalytics(
        tuned.latest_tuning_job.name, jobs_dir=tuned.jobs_dir).dataframe()
    assert kind == "frame" and [r["TrainingJobName"] for r in framed] == [
        r["TrainingJobName"] for r in rows]


def test_deploy_serves_the_best_model(tuned, source_dir):
    best = tuned.best_training_job()
    score = load_script(source_dir / "train.py").score(
        **{k: v for k, v in summaries(tuned)[best]["TunedHyperParameters"].items()},
        activation="tanh")
    predictor = tuned.deploy(initial_instance_count=1, instance_type="local")
    try:
        answer = predictor.predict(np.array([1.0, 2.0]))
        np.testing.assert_allclose(answer, [score, 2 * score])
    finally:
        predictor.delete_endpoint()


def test_minimize_picks_the_smallest_loss(source_dir, tmp_path):
    tuner = HyperparameterTuner(
        estimator(source_dir, tmp_path / "jobs"), LOSS,
        {"lr": ContinuousParameter(0.001, 0.1), "layers": IntegerParameter(1, 4)},
        metric_definitions=METRICS, objective_type="Minimize", strategy="Random",
        max_jobs=3, max_parallel_jobs=3, random_seed=11, base_tuning_job_name="loss-search")
    tuner.fit()
    finals = {name: logged_values(tmp_path / "jobs" / name, LOSS)[-1]
              for name in summaries(tuner)}
    assert len(finals) == 3 and len(set(finals.values())) == 3
    assert finals[tuner.best_training_job()] == min(finals.values())
    assert tuner.latest_tuning_job.name.startswith("loss-search-")


def test_grid_runs_every_combination(source_dir, tmp_path):
    tuner = HyperparameterTuner(
        estimator(source_dir, tmp_path / "jobs", epochs=1), ACCURACY,
        {"activation": CategoricalParameter(["relu", "tanh"]), "layers": IntegerParameter(1, 3)},
        metric_definitions=METRICS, strategy="Grid", max_jobs=None, max_parallel_jobs=3)
    tuner.fit()
    tried = [s["TunedHyperParameters"] for s in summaries(tuner).values()]
    assert sorted((t["activation"], t["layers"]) for t in tried) == list(
        itertools.product(["relu", "tanh"], [1, 2, 3]))
    described = tuner.describe()
    assert described["TrainingJobStatusCounters"]["Completed"] == 6
    assert described["HyperParameterTuningJobConfig"]["ResourceLimits"][
        "MaxNumberOfTrainingJobs"] == 6
    best = summaries(tuner)[tuner.best_training_job()]["TunedHyperParameters"]
    assert best == {"activation": "tanh", "layers": 2}


def test_logarithmic_samples_stay_in_range(source_dir, tmp_path):
    tuner = HyperparameterTuner(
        estimator(source_dir, tmp_path / "jobs", epochs=1), ACCURACY,
        {"lr": ContinuousParameter(1e-5, 1e-1, "Logarithmic"),
         "layers": IntegerParameter(1, 64, "Logarithmic"),
         "momentum": ContinuousParameter(0.9, 0.999, "ReverseLogarithmic")},
        metric_definitions=METRICS, strategy="Random", max_jobs=4, max_parallel_jobs=4,
        random_seed=5)
    tuner.fit()
    tried = [s["TunedHyperParameters"] for s in summaries(tuner).values()]
    assert len(tried) == 4
    for values in tried:
        assert 1e-5 <= values["lr"] <= 1e-1 and isinstance(values["lr"], float)
        assert 1 <= values["layers"] <= 64 and isinstance(values["layers"], int)
        assert 0.9 <= values["momentum"] <= 0.999
    assert len({v["lr"] for v in tried}) == 4


def test_reverse_logarithmic_draws_one_minus_x_log_uniformly():
    momentum = ContinuousParameter(0.9, 0.999, "ReverseLogarithmic")
    distribution = momentum.distribution("momentum")
    assert distribution.log
    assert distribution.low == pytest.approx(0.001) and distribution.high == pytest.approx(0.1)
    assert momentum.from_sample(0.01) == pytest.approx(0.99)
    assert momentum.from_sample(0.1) == pytest.approx(0.9)


def test_early_stopping_stops_jobs_worse_than_the_median(source_dir, tmp_path):
    # One job at a time, in grid order: three good jobs complete first (the
    # median stopping rule's warm-up), then the two bad ones fall below it.
    qualities = ["0.9", "0.8", "0.85", "0.2", "0.3"]
    tuner = HyperparameterTuner(
        estimator(source_dir, tmp_path / "jobs", epochs=8, sleep=0.25), ACCURACY,
        {"quality": CategoricalParameter(qualities)}, metric_definitions=METRICS,
        strategy="Grid", early_stopping_type="Auto", max_parallel_jobs=1, random_seed=0)
    tuner.fit()
    jobs = summaries(tuner)
    by_quality = {s["TunedHyperParameters"]["quality"]: s for s in jobs.values()}
    assert list(by_quality) == qualities
    completed = [by_quality[q] for q in ("0.9", "0.8", "0.85")]
    assert all(s["TrainingJobStatus"] == "Completed" for s in completed)
    for quality in ("0.2", "0.3"):
        stopped = by_quality[quality]
        assert stopped["TrainingJobStatus"] == "Stopped" and stopped["EarlyStopped"]
        assert stopped["FailureReason"].startswith(
            "stopped early as worse than the median of the completed jobs: its validation-acc")
        assert stopped["FailureReason"].endswith("at step 1")
        logged = logged_values(tmp_path / "jobs" / stopped["TrainingJobName"], ACCURACY)
        assert 2 <= len(logged) < 8  # stopped after the warm-up step, before the end
        step = 1
        assert logged[step] < statistics.median(
            [c["ObjectiveMetricValues"][step] for c in completed])
        trial = next(t for t in tuner.latest_tuning_job.trials
                     if t.name == stopped["TrainingJobName"])
        assert trial.job.status == "Stopped"
        assert trial.job.describe()["TrainingJobStatus"] == "Stopped"
        assert not alive(trial.job.process.pid)
        assert trial.optuna_trial is not None
    described = tuner.describe()
    assert described["TrainingJobStatusCounters"]["Stopped"] == 2
    assert described["TrainingJobStatusCounters"]["Completed"] == 3
    assert by_quality["0.9"]["TrainingJobName"] == tuner.best_training_job()
    assert tuner.latest_tuning_job._study.trials[3].state.name == "PRUNED"


def test_failed_jobs_are_reported_and_the_tuner_goes_on(source_dir, tmp_path):
    tuner = HyperparameterTuner(
        estimator(source_dir, tmp_path / "jobs", epochs=2), ACCURACY,
        {"mode": CategoricalParameter(["ok", "crash", "silent"])}, metric_definitions=METRICS,
        strategy="Grid", max_parallel_jobs=3)
    tuner.fit()
    by_mode = {s["TunedHyperParameters"]["mode"]: s for s in summaries(tuner).values()}
    assert by_mode["ok"]["TrainingJobStatus"] == "Completed"
    crashed = by_mode["crash"]
    assert crashed["TrainingJobStatus"] == "Failed" and crashed["ObjectiveStatus"] == "Failed"
    assert crashed["FailureReason"].startswith("RuntimeError: asked to crash")
    silent = by_mode["silent"]
    assert silent["TrainingJobStatus"] == "Failed"
    assert "completed but printed no validation-accuracy" in silent["FailureReason"]
    described = tuner.describe()
    assert described["HyperParameterTuningJobStatus"] == "Completed"
    assert described["TrainingJobStatusCounters"]["NonRetryableError"] == 2
    assert described["ObjectiveStatusCounters"] == {"Succeeded": 1, "Pending": 0, "Failed": 2}
    assert tuner.best_training_job() == by_mode["ok"]["TrainingJobName"]

    doomed = HyperparameterTuner(
        estimator(source_dir, tmp_path / "jobs"), ACCURACY,
        {"mode": CategoricalParameter(["crash"])}, metric_definitions=METRICS, strategy="Grid")
    with pytest.raises(TuningJobError, match="none of the 1 training jobs completed.*asked to"):
        doomed.fit()
    assert doomed.describe()["HyperParameterTuningJobStatus"] == "Failed"
    with pytest.raises(SmchainerError, match=r"no training job .* completed \(1 failed\); the "
                                             r"first failure: RuntimeError: asked to crash"):
        doomed.best_training_job()


@pytest.mark.skipif(gpu_count() > 0, reason="a GPU is present")
def test_a_job_that_cannot_start_fails_the_tuning_job(source_dir, tmp_path):
    chainer = Chainer(entry_point="train.py", source_dir=str(source_dir),
                      instance_type="local_gpu", jobs_dir=tmp_path / "jobs")
    tuner = HyperparameterTuner(chainer, ACCURACY, {"lr": ContinuousParameter(0.001, 0.1)},
                                metric_definitions=METRICS, max_jobs=3)
    with pytest.raises(TuningJobError, match=r"training job \S+-001-\w+ could not start: "
                                             r"DeviceError: instance_type='local_gpu'"):
        tuner.fit()
    described = tuner.describe()
    assert described["HyperParameterTuningJobStatus"] == "Failed"
    assert described["TrainingJobStatusCounters"]["NonRetryableError"] == 1


def test_stop_tuning_job_stops_the_running_jobs(source_dir, tmp_path):
    tuner = HyperparameterTuner(
        estimator(source_dir, tmp_path / "jobs", epochs=100, sleep=0.1), ACCURACY,
        {"lr": ContinuousParameter(0.001, 0.1)}, metric_definitions=METRICS,
        strategy="Random", max_jobs=4, max_parallel_jobs=2)
    tuner.fit(wait=False)
    deadline = time.monotonic() + 30
    while not all(s["ObjectiveMetricValues"] for s in summaries(tuner).values()) \
            or len(summaries(tuner)) < 2:
        assert time.monotonic() < deadline, "the jobs did not start"
        time.sleep(0.1)
    assert tuner.describe()["HyperParameterTuningJobStatus"] == "InProgress"
    tuner.stop_tuning_job()
    tuner.wait()
    described = tuner.describe()
    assert described["HyperParameterTuningJobStatus"] == "Stopped"
    assert described["TrainingJobStatusCounters"]["Stopped"] == 2
    for trial in tuner.latest_tuning_job.trials:
        assert trial.job.status == "Stopped" and not alive(trial.job.process.pid)
    with pytest.raises(SmchainerError, match=r"\(2 stopped\)"):
        tuner.best_training_job()


def test_hyperband_runs_with_optuna_s_hyperband_pruner(source_dir, tmp_path):
    tuner = HyperparameterTuner(
        estimator(source_dir, tmp_path / "jobs", epochs=3), ACCURACY,
        {"lr": ContinuousParameter(0.001, 0.1)}, metric_definitions=METRICS,
        strategy="Hyperband", max_jobs=2, max_parallel_jobs=2,
        strategy_config={"HyperbandStrategyConfig": {"MinResource": 1, "MaxResource": 3}})
    tuner.fit()
    assert tuner.describe()["HyperParameterTuningJobConfig"]["StrategyConfig"] == {
        "HyperbandStrategyConfig": {"MinResource": 1, "MaxResource": 3}}
    assert type(tuner.latest_tuning_job._study.pruner).__name__ == "HyperbandPruner"
    assert tuner.best_training_job() in summaries(tuner)


def test_metric_definitions_default_to_the_estimator_s(tmp_path):
    chainer = Chainer(entry_point="train.py", jobs_dir=tmp_path)
    chainer.metric_definitions = METRICS
    tuner = HyperparameterTuner(chainer, LOSS, {"lr": ContinuousParameter(0.1, 0.2)})
    assert tuner.metric_definitions == METRICS
    assert metric_values("epoch 1 validation-loss=0.5\nx validation-loss=0.25 y", METRICS) == {
        ACCURACY: [], LOSS: [0.5, 0.25]}


@pytest.mark.parametrize(("ranges", "message"), [
    ({"lr": ContinuousParameter(0.5, 0.1)}, r"'lr': min_value 0.5 is above max_value 0.1"),
    ({"lr": ContinuousParameter(0.0, 0.1, "Logarithmic")},
     r"'lr': Logarithmic scaling needs a positive range"),
    ({"n": IntegerParameter(-2, 8, "Logarithmic")}, r"'n': Logarithmic scaling needs a posit"),
    ({"m": ContinuousParameter(0.5, 1.0, "ReverseLogarithmic")},
     r"'m': ReverseLogarithmic scaling needs 0 <= min_value < max_value < 1"),
    ({"n": IntegerParameter(1.5, 4)}, r"'n': an IntegerParameter range needs whole numbers"),
    ({"lr": ContinuousParameter("a", 1)}, r"'lr': min_value and max_value must be numbers"),
    ({"act": CategoricalParameter([])}, r"'act': a CategoricalParameter needs at least one"),
    ({"act": CategoricalParameter(["a", "a"])}, r"'act': the values \['a', 'a'\] repeat"),
    ({"lr": (0.1, 0.2)}, r"'lr': give a ContinuousParameter"),
    ({}, r"hyperparameter_ranges must name at least one"),
])
def test_bad_ranges_raise_naming_the_hyperparameter(ranges, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        HyperparameterTuner(Chainer(entry_point="train.py", jobs_dir=tmp_path), ACCURACY,
                            ranges, metric_definitions=METRICS)


def test_bad_settings_raise_value_errors(tmp_path):
    chainer = Chainer(entry_point="train.py", jobs_dir=tmp_path)
    lr = {"lr": ContinuousParameter(0.1, 0.2)}

    def make(**kwargs):
        settings = {"metric_definitions": METRICS, **kwargs}
        return HyperparameterTuner(chainer, settings.pop("objective", ACCURACY),
                                   settings.pop("ranges", lr), **settings)

    with pytest.raises(ValueError, match="metric_definitions are needed"):
        make(metric_definitions=None)
    with pytest.raises(ValueError, match=r"objective metric 'f1' has no definition in "
                                         r"metric_definitions \(they define 'validation-acc"):
        make(objective="f1")
    with pytest.raises(ValueError, match="needs a capture group"):
        make(metric_definitions=[{"Name": ACCURACY, "Regex": "accuracy=[0-9.]+"}])
    with pytest.raises(ValueError, match="does not compile"):
        make(metric_definitions=[{"Name": ACCURACY, "Regex": "accuracy=([0-9.]+"}])
    with pytest.raises(ValueError, match="ReverseLogarithmic scaling is for ContinuousP"):
        IntegerParameter(1, 5, "ReverseLogarithmic")
    with pytest.raises(ValueError, match="scaling_type 'Log'"):
        ContinuousParameter(1, 5, "Log")
    with pytest.raises(ValueError, match="strategy 'Annealing': use one of Bayesian, Random"):
        make(strategy="Annealing")
    with pytest.raises(ValueError, match="objective_type 'Max'"):
        make(objective_type="Max")
    with pytest.raises(ValueError, match="early_stopping_type 'On'"):
        make(early_stopping_type="On")
    with pytest.raises(ValueError, match="max_jobs must be a whole number >= 1"):
        make(max_jobs=0)
    with pytest.raises(ValueError, match="max_parallel_jobs must be a whole number >= 1"):
        make(max_parallel_jobs=0)
    with pytest.raises(ValueError, match="'lr': the Grid strategy takes categorical and int"):
        make(strategy="Grid")
    with pytest.raises(ValueError, match="'Hyperband' stops jobs early itself"):
        make(strategy="Hyperband", early_stopping_type="Auto")
    with pytest.raises(ValueError, match="tuning job name 'a_b'"):
        make().fit(job_name="a_b")
    with pytest.raises(SmchainerError, match=r"call fit\(\) first"):
        make().best_training_job()
    with pytest.warns(IgnoredArgumentWarning, match="warm_start_config= only matters on AWS"):
        make(warm_start_config=object())
