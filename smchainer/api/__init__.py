"""The SageMaker Python SDK's notebook calls, run on this machine.

A SageMaker Chainer notebook runs after changing its imports::

    from smchainer.api import Chainer, Session

    session = Session()                       # S3 when a bucket is set, else local paths
    train = session.upload_data("data/train", key_prefix="cifar/train")
    estimator = Chainer(entry_point="train.py", source_dir="src",
                        hyperparameters={"epochs": 1}, instance_count=2,
                        instance_type="local")
    estimator.fit({"train": train, "test": test})
    predictor = estimator.deploy(initial_instance_count=1, instance_type="local")
    predictor.predict(images)
    estimator.delete_endpoint()

    transformer = estimator.transformer(instance_count=1, instance_type="local")
    transformer.transform("data/batch", content_type="text/csv", split_type="Line")
    tuner = HyperparameterTuner(estimator, "validation:accuracy",
                                {"learning-rate": ContinuousParameter(0.01, 0.2)},
                                metric_definitions=[{"Name": "validation:accuracy",
                                                     "Regex": r"accuracy=([0-9.]+)"}],
                                max_jobs=4, max_parallel_jobs=2)
    tuner.fit({"train": train})

Training runs ``smchainer-train``, serving ``smchainer-serve`` and batch
transform ``smchainer-transform``'s job in child processes; nothing here
imports Chainer, boto3, gunicorn or Optuna until it is used.
"""
from smchainer.api import deserializers, serializers
from smchainer.api.endpoint import EndpointError, LocalEndpoint
from smchainer.api.estimator import Chainer, Estimator, TrainingJob, TrainingJobError
from smchainer.api.local_mode import IgnoredArgumentWarning
from smchainer.api.model import ChainerModel, Model
from smchainer.api.parameter import CategoricalParameter, ContinuousParameter, IntegerParameter
from smchainer.api.predictor import PredictionError, Predictor
from smchainer.api.session import Session, get_execution_role
from smchainer.api.transformer import LocalTransformJob, Transformer, TransformJobError
from smchainer.api.tuner import (
    HyperparameterTuner,
    HyperparameterTuningJobAnalytics,
    TuningJobError,
)

__all__ = [
    "CategoricalParameter", "Chainer", "ChainerModel", "ContinuousParameter", "EndpointError",
    "Estimator", "HyperparameterTuner", "HyperparameterTuningJobAnalytics",
    "IgnoredArgumentWarning", "IntegerParameter", "LocalEndpoint", "LocalTransformJob", "Model",
    "PredictionError", "Predictor", "Session", "TrainingJob", "TrainingJobError",
    "TransformJobError", "Transformer", "TuningJobError", "deserializers",
    "get_execution_role", "serializers",
]
