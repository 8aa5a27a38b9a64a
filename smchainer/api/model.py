"""``Model``: trained artifacts plus the script that serves them, deployable locally.

``Estimator.deploy()`` goes through here; a notebook can also deploy a
``model.tar.gz`` it already has, as with the SDK's ``ChainerModel``.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from smchainer.api.endpoint import LocalEndpoint
from smchainer.api.local_mode import (
    LOCAL_GPU,
    device_environment,
    require_gpu,
    resolve_instance_type,
    warn_ignored,
)
from smchainer.api.predictor import Predictor
from smchainer.api.session import Session, local_path
from smchainer.storage import is_s3_uri

DEFAULT_STARTUP_TIMEOUT = 120


class Model:
    """A model to serve.

    :param model_data: ``model.tar.gz`` (a path or ``s3://`` URI) or a model directory.
    :param entry_point: the script with ``model_fn`` (a training script with its
        training behind the main guard works), relative to ``source_dir`` when given.
    :param source_dir: the script's folder; it is on the server's import path.
    :param env: extra environment variables of the server (``SAGEMAKER_*``, ``SMCHAINER_*``).
    :param name: the endpoint name's prefix.
    """

    def __init__(self, model_data: str | os.PathLike[str], role: Any = None,
                 entry_point: str | os.PathLike[str] | None = None,
                 source_dir: str | os.PathLike[str] | None = None,
                 env: dict[str, str] | None = None, name: str | None = None,
                 sagemaker_session: Session | None = None, predictor_cls: Any = None,
                 **aws_only: Any) -> None:
        ignored = dict(aws_only)
        if role is not None:
            ignored["role"] = role
        if sagemaker_session is not None and not isinstance(sagemaker_session, Session):
            ignored["sagemaker_session"] = sagemaker_session
            sagemaker_session = None
        warn_ignored(ignored, type(self).__name__)
        self.model_data = (str(model_data) if is_s3_uri(model_data)
                           else str(local_path(model_data).resolve()))
        self.source_dir = local_path(source_dir).resolve() if source_dir is not None else None
        self.entry_point = None
        if entry_point is not None:
            base = self.source_dir if self.source_dir is not None else Path.cwd()
            self.entry_point = (base / local_path(entry_point)).resolve()
        self.env = dict(env or {})
        self.name = name or "smchainer-model"
        self.sagemaker_session = sagemaker_session or Session()
        self.predictor_cls = predictor_cls or Predictor

    def server_environment(self, instance_type: str) -> dict[str, str]:
        """The server's environment: the device, the store, the import path, ``env``."""
        env = device_environment(instance_type)
        env.update(self.sagemaker_session.environment())
        code_dirs = [str(self.source_dir)] if self.source_dir is not None else []
        if env.get("PYTHONPATH"):
            code_dirs.append(env["PYTHONPATH"])
        if code_dirs:
            env["PYTHONPATH"] = os.pathsep.join(code_dirs)
        env.update(self.env)
        return env

    def deploy(self, initial_instance_count: int = 1, instance_type: str = "local",
               serializer: Any = None, deserializer: Any = None,
               endpoint_name: str | None = None, wait: bool = True,
               model_server_workers: int | None = None,
               container_startup_health_check_timeout: float = DEFAULT_STARTUP_TIMEOUT,
               **aws_only: Any) -> Any:
        """Start ``smchainer-serve`` on a free loopback port and return a predictor.

        The server runs ``initial_instance_count`` x ``model_server_workers``
        (default 1) workers, on the CPU for ``local`` and on the GPUs for
        ``local_gpu`` (worker i on GPU i mod n). With ``wait`` it returns once
        every worker has loaded the model; a server that exits, a failing
        ``model_fn`` or the timeout raise
        :class:`~smchainer.api.endpoint.EndpointError` with the server's
        last log lines.
        """
        warn_ignored(aws_only, "deploy")
        kind = resolve_instance_type(instance_type)
        if kind == LOCAL_GPU:
            require_gpu()
        if isinstance(initial_instance_count, bool) or not isinstance(
                initial_instance_count, int) or initial_instance_count < 1:
            raise ValueError(f"initial_instance_count must be a whole number >= 1, "
                             f"not {initial_instance_count!r}")
        workers = initial_instance_count * (model_server_workers or 1)
        name = endpoint_name or f"{self.name[:40]}-{secrets.token_hex(3)}"
        endpoint = LocalEndpoint(
            name, self.model_data,
            entry_point=str(self.entry_point) if self.entry_point is not None else None,
            workers=workers, env=self.server_environment(kind),
            endpoint_url=self.sagemaker_session.endpoint_url,
        )
        endpoint.start(wait=wait, timeout=container_startup_health_check_timeout)
        if hasattr(self.predictor_cls, "for_endpoint"):
            return self.predictor_cls.for_endpoint(endpoint, serializer=serializer,
                                                   deserializer=deserializer)
        return self.predictor_cls(endpoint.name)

    def transformer(self, instance_count: int = 1, instance_type: str = "local",
                    strategy: str | None = None, assemble_with: str | None = None,
                    output_path: str | os.PathLike[str] | None = None,
                    accept: str | None = None, max_concurrent_transforms: int | None = None,
                    max_payload: int | None = None, env: dict[str, str] | None = None,
                    model_server_workers: int | None = None, **aws_only: Any) -> Any:
        """A :class:`~smchainer.api.transformer.Transformer` of this model (batch transform).

        Each ``transform()`` starts ``smchainer-serve`` for the model with
        ``instance_count`` x ``model_server_workers`` (default 1) workers, as
        :meth:`deploy` does, and stops it when the job ends. ``env`` is added
        to the server's environment; AWS-only arguments (``output_kms_key``,
        ``tags``, ``volume_kms_key``...) are ignored with a warning.
        """
        from smchainer.api.transformer import Transformer

        warn_ignored(aws_only, "transformer")
        return Transformer(self, instance_count=instance_count, instance_type=instance_type,
                           strategy=strategy, assemble_with=assemble_with,
                           output_path=output_path, accept=accept,
                           max_concurrent_transforms=max_concurrent_transforms,
                           max_payload=max_payload, env=env,
                           model_server_workers=model_server_workers,
                           sagemaker_session=self.sagemaker_session)


#: The SDK's name for a Chainer model.
ChainerModel = Model
