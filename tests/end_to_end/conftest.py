"""The serving fixtures, shared with the end-to-end tests."""
from tests.serving.conftest import start_server  # noqa: F401
