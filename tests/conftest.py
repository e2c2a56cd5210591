"""Shared test switches.

SOCKSD_TEST_STRICT=1 (set by .ci/run) turns every "this machine lacks X" skip into a
failure, so CI can never go green by skipping what it was meant to prove.
"""

from __future__ import annotations

import os

import pytest

STRICT = os.environ.get("SOCKSD_TEST_STRICT") == "1"


def need(condition: bool, reason: str) -> None:
    """Skip (or, in strict mode, fail) when a capability the test needs is missing."""
    if condition:
        return
    if STRICT:
        pytest.fail(f"required capability missing (SOCKSD_TEST_STRICT=1): {reason}")
    pytest.skip(reason)
