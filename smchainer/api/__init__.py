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
    predictor.delete_endpoint()

Training runs ``smchainer-train`` and serving ``smchainer-serve`` in child
processes; nothing here imports Chainer, boto3 or gunicorn until it is used.
"""
from smchainer.api import deserializers, serializers
from smchainer.api.endpoint import EndpointError, LocalEndpoint
from smchainer.api.estimator import Chainer, Estimator, TrainingJob, TrainingJobError
from smchainer.api.local_mode import IgnoredArgumentWarning
from smchainer.api.model import ChainerModel, Model
from smchainer.api.predictor import PredictionError, Predictor
from smchainer.api.session import Session, get_execution_role

__all__ = [
    "Chainer", "ChainerModel", "EndpointError", "Estimator", "IgnoredArgumentWarning",
    "LocalEndpoint", "Model", "PredictionError", "Predictor", "Session", "TrainingJob",
    "TrainingJobError", "deserializers", "get_execution_role", "serializers",
]
