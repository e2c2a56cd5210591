"""TIME_WAIT sampling: /proc/net/tcp{,6} parsing on hand-written rows, plus one real check.

The hand-written rows use little-endian words, as a little-endian kernel prints them;
`_hex` re-derives them from the address text so a typo in a literal cannot hide.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys
import time
from pathlib import Path

import pytest

from socksd.timewait import (
    TimeWaitSample,
    decode_endpoint,
    decode_ip,
    parse_proc_net_tcp,
    sample_time_wait,
)

little_endian_only = pytest.mark.skipif(
    sys.byteorder != "little", reason="hand-written rows are little-endian /proc output"
)

TAIL = "00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000"

TCP = f"""\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5855 1 0
   1: 0100007F:C350 0100007F:1F90 06 {TAIL}
   2: 010200C0:C351 036433C6:01BB 06 {TAIL}
   3: 010200C0:C352 036433C6:01BB 06 {TAIL}
   4: 010200C0:C353 036433C6:01BB 01 00000000:00000000 00:00000000 00000000  1000 0 77 1 0
   5: 020200C0:C354 036433C6:01BB 06 {TAIL}
"""

# 2001:db8::1 -> 2001:db8::3 port 443 (TIME_WAIT), ::1 listening, ::ffff:192.0.2.1 ->
# ::ffff:198.51.100.3 port 443 (TIME_WAIT, must merge with the IPv4 rows), one
# ESTABLISHED IPv6 row.
TCP6 = f"""\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0
   1: B80D0120000000000000000001000000:C350 B80D0120000000000000000003000000:01BB 06 {TAIL}
   2: 0000000000000000FFFF0000010200C0:C355 0000000000000000FFFF0000036433C6:01BB 06 {TAIL}
   3: B80D0120000000000000000001000000:C351 B80D0120000000000000000003000000:01BB 01 {TAIL}
"""  # noqa: E501


def _hex(text: str) -> str:
    """Encode an address the way the kernel prints it (host-order 32-bit words)."""
    packed = ipaddress.ip_address(text).packed
    words = struct.unpack(f"={len(packed) // 4}I", packed)
    return "".join(f"{w:08X}" for w in words)


@little_endian_only
@pytest.mark.parametrize(
    ("literal", "text"),
    [
        ("0100007F", "127.0.0.1"),
        ("010200C0", "192.0.2.1"),
        ("036433C6", "198.51.100.3"),
        ("B80D0120000000000000000001000000", "2001:db8::1"),
        ("00000000000000000000000001000000", "::1"),
        ("0000000000000000FFFF0000010200C0", "::ffff:192.0.2.1"),
    ],
)
def test_hand_written_literals_match_kernel_encoding(literal: str, text: str) -> None:
    assert _hex(text) == literal


@pytest.mark.parametrize(
    "text",
    ["0.0.0.0", "10.1.2.3", "255.255.255.254", "fe80::1", "2001:db8:0:1::ab:cd", "::"],
)
def test_decode_ip_round_trips_host_order_words(text: str) -> None:
    assert decode_ip(_hex(text)) == ipaddress.ip_address(text).compressed


def test_decode_ip_reports_ipv4_mapped_as_ipv4() -> None:
    assert decode_ip(_hex("::ffff:203.0.113.9")) == "203.0.113.9"


def test_decode_endpoint_formats_ports_and_brackets_ipv6() -> None:
    assert decode_endpoint(_hex("127.0.0.1") + ":1F90") == "127.0.0.1:8080"
    assert decode_endpoint(_hex("2001:db8::3") + ":01BB") == "[2001:db8::3]:443"


@pytest.mark.parametrize("bad", ["0100007F", "0100007F:1F9", "01007F:1F90", "XYZ0007F:1F90"])
def test_decode_endpoint_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        decode_endpoint(bad)


@little_endian_only
def test_parse_tcp_yields_only_time_wait_rows() -> None:
    rows = list(parse_proc_net_tcp(TCP.splitlines(keepends=True), v6=False))
    assert rows == [
        ("127.0.0.1", "127.0.0.1:8080"),
        ("192.0.2.1", "198.51.100.3:443"),
        ("192.0.2.1", "198.51.100.3:443"),
        ("192.0.2.2", "198.51.100.3:443"),
    ]


@little_endian_only
def test_parse_tcp6_compresses_ipv6_and_unmaps_ipv4() -> None:
    rows = list(parse_proc_net_tcp(TCP6.splitlines(), v6=True))
    assert rows == [
        ("2001:db8::1", "[2001:db8::3]:443"),
        ("192.0.2.1", "198.51.100.3:443"),
    ]


def test_parse_skips_blank_and_short_lines() -> None:
    assert list(parse_proc_net_tcp(["", "\n", "  sl  local_address\n"], v6=False)) == []


def test_parse_rejects_width_not_matching_v6() -> None:
    row = f"   1: {_hex('2001:db8::1')}:C350 {_hex('2001:db8::3')}:01BB 06 {TAIL}"
    with pytest.raises(ValueError, match="v6=False"):
        list(parse_proc_net_tcp([row], v6=False))


def _proc(tmp_path: Path, tcp: str | None = TCP, tcp6: str | None = TCP6) -> str:
    if tcp is not None:
        (tmp_path / "tcp").write_text(tcp)
    if tcp6 is not None:
        (tmp_path / "tcp6").write_text(tcp6)
    return str(tmp_path)


@little_endian_only
def test_sample_merges_files_and_sorts_by_count(tmp_path: Path) -> None:
    sample = sample_time_wait(root=_proc(tmp_path))
    assert sample == TimeWaitSample(
        total=6,
        by_pair=(
            ("192.0.2.1", "198.51.100.3:443", 3),  # two from tcp, one mapped from tcp6
            ("127.0.0.1", "127.0.0.1:8080", 1),
            ("192.0.2.2", "198.51.100.3:443", 1),
            ("2001:db8::1", "[2001:db8::3]:443", 1),
        ),
        truncated=False,
    )


@little_endian_only
def test_sample_top_truncates_rows_not_total(tmp_path: Path) -> None:
    sample = sample_time_wait(root=_proc(tmp_path), top=1)
    assert sample.total == 6
    assert sample.by_pair == (("192.0.2.1", "198.51.100.3:443", 3),)
    assert sample_time_wait(root=_proc(tmp_path), top=0).by_pair == ()


@little_endian_only
def test_sample_filters_by_local_ip_in_any_spelling(tmp_path: Path) -> None:
    root = _proc(tmp_path)
    only_v4 = sample_time_wait(root=root, local_ips=["::ffff:192.0.2.1"])
    assert only_v4 == TimeWaitSample(3, (("192.0.2.1", "198.51.100.3:443", 3),))
    only_v6 = sample_time_wait(root=root, local_ips={"2001:0db8:0000::0001"})
    assert only_v6 == TimeWaitSample(1, (("2001:db8::1", "[2001:db8::3]:443", 1),))
    assert sample_time_wait(root=root, local_ips=()) == TimeWaitSample(0, ())


def test_sample_rejects_bad_local_ip(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not appear to be"):
        sample_time_wait(root=_proc(tmp_path), local_ips=["not-an-ip"])


def test_sample_missing_files_count_as_empty(tmp_path: Path) -> None:
    assert sample_time_wait(root=str(tmp_path)) == TimeWaitSample(0, (), False)


@little_endian_only
def test_sample_reads_tcp_alone_when_tcp6_missing(tmp_path: Path) -> None:
    assert sample_time_wait(root=_proc(tmp_path, tcp6=None)).total == 4


@little_endian_only
def test_sample_max_rows_caps_each_file_and_marks_truncated(tmp_path: Path) -> None:
    root = _proc(tmp_path)
    # Header + rows 0..2 of each file: tcp gives 127.0.0.1 and one 192.0.2.1 row; tcp6
    # gives the 2001:db8::1 row and the mapped 192.0.2.1 row.
    partial = sample_time_wait(root=root, max_rows=4)
    assert partial == TimeWaitSample(
        total=4,
        by_pair=(
            ("192.0.2.1", "198.51.100.3:443", 2),
            ("127.0.0.1", "127.0.0.1:8080", 1),
            ("2001:db8::1", "[2001:db8::3]:443", 1),
        ),
        truncated=True,
    )
    # Exactly every line of the longer file: complete, not truncated.
    longest = max(len(TCP.splitlines()), len(TCP6.splitlines()))
    assert sample_time_wait(root=root, max_rows=longest) == sample_time_wait(root=root)
    assert sample_time_wait(root=root, max_rows=longest - 1).truncated
    # Only tcp6 over the cap still marks the sample truncated.
    assert sample_time_wait(root=root, max_rows=len(TCP6.splitlines()) - 1).truncated
    assert sample_time_wait(root=root, max_rows=0) == TimeWaitSample(0, (), True)


def _wait_for_time_wait(port: int, deadline_s: float = 2.0) -> TimeWaitSample:
    target = f"127.0.0.1:{port}"
    end = time.monotonic() + deadline_s
    while True:
        # top is large: the test machine may hold many other loopback TIME_WAITs.
        sample = sample_time_wait(top=1_000_000, local_ips=["127.0.0.1"])
        if any(t == target for _, t, _ in sample.by_pair) or time.monotonic() >= end:
            return sample
        time.sleep(0.01)


def test_real_time_wait_on_loopback_is_seen() -> None:
    """The side that closes first holds TIME_WAIT (RFC 793 3.5): here, the client."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.settimeout(2.0)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port), timeout=2.0)
        server, _ = listener.accept()
        with server:
            server.settimeout(2.0)
            client.close()  # our FIN first: client -> FIN_WAIT_1/2
            assert server.recv(1) == b""  # server saw the FIN: CLOSE_WAIT
        # server closed: LAST_ACK; its FIN moves the client to TIME_WAIT.
    sample = _wait_for_time_wait(port)
    target = f"127.0.0.1:{port}"
    pairs = {(ip, t): n for ip, t, n in sample.by_pair}
    assert pairs.get(("127.0.0.1", target), 0) >= 1, sample
    assert sample.total >= 1
