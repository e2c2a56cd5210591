"""The shared codec vocabulary (`socksd.codec`) and the `ServerCodec` interface.

Both server codecs must offer every member a session drives, with the Protocol's
signatures; `socksd.socks5` must keep exporting every name that moved out of it. No
sockets.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import socksd.codec as codec_module
import socksd.socks5 as socks5_module
from socksd.codec import ServerCodec
from socksd.socks4 import Socks4ServerConnection
from socksd.socks5 import Socks5ServerConnection

if TYPE_CHECKING:  # `mypy tests/unit/test_codec.py` proves what the runtime tests below probe
    _SOCKS5: type[ServerCodec] = Socks5ServerConnection
    _SOCKS4: type[ServerCodec] = Socks4ServerConnection

CODECS = [Socks5ServerConnection, Socks4ServerConnection]

# What a session needs from a codec, and nothing more: a new front door implements these.
MEMBERS = {
    "state",
    "trailing_data",
    "receive_data",
    "receive",
    "next_event",
    "send",
    "send_success",
}
PROPERTIES = {"state", "trailing_data"}

# The names that moved from socksd.socks5 to socksd.codec.
MOVED = [
    "NEED_DATA",
    "NeedData",
    "State",
    "ProtocolError",
    "LocalProtocolError",
    "Greeting",
    "UserPassAuth",
    "CommandRequest",
    "ConnectionClosed",
    "Event",
    "MethodSelection",
    "AuthStatus",
    "CommandReply",
    "ServerMessage",
    "Command",
    "AddressType",
    "Reply",
    "Method",
]


def _protocol_members() -> set[str]:
    return {name for name in vars(ServerCodec) if not name.startswith("_")}


def test_the_protocol_is_exactly_what_a_session_needs() -> None:
    assert _protocol_members() == MEMBERS


@pytest.mark.parametrize("cls", CODECS, ids=lambda c: c.__name__)
def test_codec_has_every_protocol_member(cls: type) -> None:
    for name in MEMBERS:
        assert hasattr(cls, name), (cls.__name__, name)
        if name in PROPERTIES:
            assert isinstance(inspect.getattr_static(cls, name), property), name
        else:
            assert callable(getattr(cls, name)), name


@pytest.mark.parametrize("cls", CODECS, ids=lambda c: c.__name__)
def test_codec_signatures_match_the_protocol(cls: type) -> None:
    # Same parameter names and kinds (a session may pass them by keyword); the types
    # are mypy's to check (the TYPE_CHECKING block above, and socks4.py/socks5.py's).
    for name in MEMBERS - PROPERTIES:
        expected = inspect.signature(getattr(ServerCodec, name)).parameters.values()
        got = inspect.signature(getattr(cls, name)).parameters.values()
        assert [(p.name, p.kind) for p in got] == [(p.name, p.kind) for p in expected], (
            cls.__name__,
            name,
        )


@pytest.mark.parametrize("cls", CODECS, ids=lambda c: c.__name__)
def test_a_fresh_codec_answers_the_protocol_properties(cls: type[ServerCodec]) -> None:
    codec = cls()
    assert isinstance(codec.state, codec_module.State)
    assert codec.trailing_data == b""


@pytest.mark.parametrize("name", MOVED)
def test_socks5_still_exports_every_moved_name(name: str) -> None:
    assert name in socks5_module.__all__
    assert name in codec_module.__all__
    assert getattr(socks5_module, name) is getattr(codec_module, name)


def test_moved_names_import_from_socks5() -> None:
    from socksd.socks5 import (  # noqa: F401 - the import is the test
        NEED_DATA,
        AddressType,
        AuthStatus,
        Command,
        CommandReply,
        CommandRequest,
        ConnectionClosed,
        Event,
        Greeting,
        LocalProtocolError,
        Method,
        MethodSelection,
        NeedData,
        ProtocolError,
        Reply,
        ServerMessage,
        State,
        UserPassAuth,
    )


def test_every_moved_name_is_defined_in_codec() -> None:
    tree = ast.parse(Path(socks5_module.__file__ or "").read_text())
    defined = {
        node.name for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))
    } | {
        target.id
        for node in tree.body
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        for target in ([node.target] if isinstance(node, ast.AnnAssign) else node.targets)
        if isinstance(target, ast.Name)
    }
    assert not defined & set(MOVED), "defined again in socks5.py"


def test_codec_module_imports_nothing_that_does_io() -> None:
    tree = ast.parse(Path(codec_module.__file__ or "").read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    # No socksd module either: every codec imports this one.
    assert imported <= {"collections.abc", "dataclasses", "enum", "typing"}


@pytest.mark.parametrize("module", ["socksd.socks4", "socksd.socks5", "socksd.socks5_udp"])
def test_codecs_import_no_socksd_module_but_codecs(module: str) -> None:
    import importlib

    path = Path(importlib.import_module(module).__file__ or "")
    from_socksd = {
        node.module
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("socksd")
    }
    assert from_socksd <= {"socksd.codec", "socksd.socks5"}
