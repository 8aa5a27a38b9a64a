"""``Predictor``: send data to an endpoint's ``/invocations`` and read the answer.

As the SageMaker SDK's Chainer predictor, it sends ``application/x-npy`` and
returns a NumPy array by default; ``serializer`` and ``deserializer`` swap
the formats (:mod:`smchainer.api.serializers`, :mod:`smchainer.api.deserializers`).
A predictor returned by ``deploy()`` owns its server: ``delete_endpoint()``,
or leaving a ``with`` block, stops it.
"""
from __future__ import annotations

import http.client
import io
import json
import logging
from typing import Any
from urllib.parse import urlsplit

from smchainer.api.deserializers import NumpyDeserializer
from smchainer.api.endpoint import LocalEndpoint, find_endpoint
from smchainer.api.serializers import NumpySerializer
from smchainer.errors import SmchainerError

logger = logging.getLogger(__name__)

#: longer than the server's own 60 s limit, so that its 504 arrives first
REQUEST_TIMEOUT = 90.0


class PredictionError(SmchainerError):
    """The endpoint answered with an error status; ``status_code`` is that status."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class Predictor:
    """A client of one endpoint.

    :param endpoint_name: the name of an endpoint deployed by this process, or
        the URL of any running ``smchainer-serve`` (``http://127.0.0.1:8080``).
    :param serializer: request encoder (default :class:`NumpySerializer`).
    :param deserializer: response decoder (default :class:`NumpyDeserializer`).
    """

    def __init__(self, endpoint_name: str, sagemaker_session: Any = None,
                 serializer: Any = None, deserializer: Any = None, *,
                 timeout: float = REQUEST_TIMEOUT, **aws_only: Any) -> None:
        from smchainer.api.local_mode import warn_ignored

        warn_ignored(aws_only, "Predictor")
        self.serializer = serializer if serializer is not None else NumpySerializer()
        self.deserializer = deserializer if deserializer is not None else NumpyDeserializer()
        self.sagemaker_session = sagemaker_session
        self.timeout = timeout
        self._endpoint: LocalEndpoint | None = None
        if endpoint_name.startswith(("http://", "https://")):
            self.endpoint_name = endpoint_name
            self.endpoint_url = endpoint_name.rstrip("/")
        else:
            endpoint = find_endpoint(endpoint_name)
            if endpoint is None:
                raise SmchainerError(
                    f"no endpoint named {endpoint_name!r} is running in this process; "
                    "deploy() one, or give the server's URL (http://host:port)")
            self._attach(endpoint)

    @classmethod
    def for_endpoint(cls, endpoint: LocalEndpoint, serializer: Any = None,
                     deserializer: Any = None) -> Predictor:
        """A predictor that owns ``endpoint`` (``delete_endpoint()`` stops it)."""
        predictor = cls(endpoint.url, serializer=serializer, deserializer=deserializer)
        predictor._attach(endpoint)
        return predictor

    def _attach(self, endpoint: LocalEndpoint) -> None:
        self._endpoint = endpoint
        self.endpoint_name = endpoint.name
        self.endpoint_url = endpoint.url

    @property
    def endpoint(self) -> LocalEndpoint | None:
        """The local server behind this predictor, when this process started it."""
        return self._endpoint

    @property
    def content_type(self) -> str:
        return self.serializer.CONTENT_TYPE

    @property
    def accept(self) -> tuple[str, ...]:
        return tuple(self.deserializer.ACCEPT)

    def predict(self, data: Any, initial_args: dict[str, str] | None = None) -> Any:
        """POST ``data`` to ``/invocations``; the deserialized answer.

        ``initial_args`` may override ``ContentType`` and ``Accept`` (the
        serializer is then skipped when ``data`` is already bytes). An error
        status raises :class:`PredictionError` with the server's message.
        """
        args = dict(initial_args or {})
        content_type = args.pop("ContentType", None) or self.content_type
        accept = args.pop("Accept", None) or ", ".join(self.accept)
        if isinstance(data, (bytes, bytearray)) and "ContentType" in (initial_args or {}):
            body = bytes(data)
        else:
            body = self.serializer.serialize(data)
        status, answer_type, answer = self._post(body, content_type, accept)
        if status >= 400:
            raise PredictionError(
                f"endpoint {self.endpoint_name} answered {status}: {_message(answer)}", status)
        return self.deserializer.deserialize(io.BytesIO(answer), answer_type)

    def _post(self, body: bytes, content_type: str, accept: str) -> tuple[int, str, bytes]:
        parts = urlsplit(self.endpoint_url)
        connection_class = (http.client.HTTPSConnection if parts.scheme == "https"
                            else http.client.HTTPConnection)
        connection = connection_class(parts.hostname or "127.0.0.1", parts.port,
                                      timeout=self.timeout)
        try:
            connection.request("POST", parts.path.rstrip("/") + "/invocations", body=body,
                               headers={"Content-Type": content_type, "Accept": accept})
            response = connection.getresponse()
            return response.status, response.getheader("Content-Type", ""), response.read()
        except OSError as error:
            raise SmchainerError(
                f"endpoint {self.endpoint_name} at {self.endpoint_url} cannot be reached: "
                f"{error}") from None
        finally:
            connection.close()

    def delete_endpoint(self, delete_endpoint_config: bool = True) -> None:
        """Stop the local server (SIGTERM, then SIGKILL after 30 s); no process is left."""
        if self._endpoint is None:
            logger.warning("endpoint %s was not started by this process: not stopped",
                           self.endpoint_url)
            return
        self._endpoint.stop()

    def delete_model(self) -> None:
        """Nothing to delete locally (kept for notebooks that call it)."""

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.delete_endpoint()

    def __repr__(self) -> str:
        return f"Predictor({self.endpoint_name!r}, url={self.endpoint_url!r})"


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body[:500].decode(errors="replace").strip()
