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


@pytest.fixture
def netns():  # -> Iterator[Callable[[str], tests.netns.NetNS]]
    """Factory for throw-away network namespaces: `ns = netns("x")`; all closed at teardown.

    Needs root and iproute2 (skipped without, failed under SOCKSD_TEST_STRICT=1).
    """
    from tests.netns import NetNS, netns_available

    need(*netns_available())
    made: list[NetNS] = []

    def make(prefix: str = "t") -> NetNS:
        ns = NetNS(prefix)
        made.append(ns)
        return ns

    try:
        yield make
    finally:
        errors: list[Exception] = []
        for ns in reversed(made):
            try:
                ns.close()
            except Exception as exc:  # noqa: BLE001 - every namespace gets its close()
                errors.append(exc)
        if errors:
            raise errors[0]
