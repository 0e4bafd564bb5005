"""What a test does when a program it needs is missing here: it is skipped, but under ``CI=true`` it
fails, since run-tests.sh installs every such program and a missing one means a broken set-up that
would otherwise pass silently."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

from test_resources.server_process import ServerProcess, ServerUnavailable


def missing_program(what: str, reason: str) -> NoReturn:
    """End the calling test for want of ``what``: a failure under ``CI=true``, else a skip giving ``reason``.

    :raises pytest.fail.Exception | pytest.skip.Exception: always.
    """
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is required in CI: {reason}")
    pytest.skip(reason)


def require_server(server: type[ServerProcess]) -> None:
    """Return if ``server`` can be launched here; otherwise end the test as `missing_program` does."""
    try:
        server.check_available()
    except ServerUnavailable as error:
        missing_program(server.name, str(error))
