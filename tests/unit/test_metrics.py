"""Prometheus exposition: rendered text checked by a small, strict 0.0.4 parser."""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any

import pytest

from socksd.metrics import FAMILIES, PREFIX, escape_label_value, format_value, render

COUNTERS = {
    "accepted": 10,
    "tunnels_opened": 9,
    "tunnels_closed": 8,
    "bytes_up": 100,
    "bytes_down": 2000,
    "handshake_failures": {"auth_failed": 1},
    "replies": {"0": 8, "5": 1},
    "egress_errors": {"connect:eaddrnotavail": 3},
    "retries": 3,
    "rescued": 2,
    "exhausted": 1,
    "dropped_lines": 0,
}

SAMPLE: dict[str, Any] = {
    "supervisor": {
        "pid": 1,
        "generation": 2,
        "reloads": 7,
        "workers_wanted": 2,
        "uptime_s": 12.5,
        "config": "/etc/socksd/socksd.toml",
    },
    "total": {"counters": COUNTERS, "gauges": {"open_tunnels": 1, "open_sessions": 2}},
    "workers": [
        {
            "slot": 0,
            "gen": 2,
            "pid": 11,
            "alive": True,
            "last_seen_s": 0.4,
            "restarts": 0,
            "counters": COUNTERS,
            "gauges": {"open_tunnels": 1, "open_sessions": 2},
        }
    ],
    "egress": {
        "ephemeral_ports": 28232,
        "ips": [
            {
                "ip": "192.0.2.1",
                "open": 3,
                "attempted": 10,
                "succeeded": 9,
                "failed": {"eaddrnotavail": 1},
                "exhausted": 1,
                "retries": 1,
                "rescued": 0,
            }
        ],
        "targets": [
            {
                "egress_ip": "192.0.2.1",
                "target": "198.51.100.3:443",
                "open": 3,
                "recent_closes": 5,
                "exhausted": 1,
                "pressure": 0.0003,
            }
        ],
        "time_wait": {
            "total": 5,
            "by_pair": [
                {
                    "egress_ip": "192.0.2.1",
                    "target": "198.51.100.3:443",
                    "count": 5,
                    "pressure": 0.0002,
                }
            ],
            "truncated": False,
        },
    },
}

EMPTY: dict[str, Any] = {
    "supervisor": {},
    "total": {"counters": {}, "gauges": {}},
    "workers": [],
    "egress": {
        "ephemeral_ports": 0,
        "ips": [],
        "targets": [],
        "time_wait": {"total": 0, "by_pair": [], "truncated": False},
    },
}


# The families the brief asks for, by name (without the prefix).
BRIEF_NAMES = """
accepted_total tunnels_opened_total tunnels_closed_total bytes_up_total bytes_down_total
handshake_failures_total refused_total udp_dropped_total replies_total
udp_datagrams_up_total udp_datagrams_down_total udp_bytes_up_total udp_bytes_down_total
egress_errors_total egress_retries_total
egress_rescued_total egress_exhausted_total stats_dropped_lines_total open_tunnels
open_sessions worker_up worker_restarts_total
generation reloads_total workers_wanted uptime_seconds ephemeral_ports
egress_open_sockets egress_connects_attempted_total egress_connects_succeeded_total
egress_connect_failures_total egress_ip_exhausted_total egress_ip_retries_total
egress_ip_rescued_total
egress_udp_sockets
egress_target_open_sockets egress_target_recent_closes egress_target_pressure
egress_target_exhausted_total
time_wait_sockets time_wait_pair_sockets time_wait_pair_pressure
dns_lookups_total dns_cache_hits_total dns_cache_misses_total dns_coalesced_total
dns_stale_answers_total dns_failures_total dns_lookup_seconds
"""


# -- a strict parser for the 0.0.4 text format -----------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
_COMMENT = re.compile(rf"# (HELP|TYPE) ({_NAME}) (.*)")
_SAMPLE_HEAD = re.compile(rf"({_NAME})(\{{)?")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}
_HELP_ESCAPES = {"\\": "\\", "n": "\n"}


class ExpositionError(AssertionError):
    pass


@dataclass
class ParsedFamily:
    help: str | None = None
    type: str | None = None
    samples: dict[tuple[tuple[str, str], ...], float] = field(default_factory=dict)


def _unescape(text: str, escapes: dict[str, str]) -> str:
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            if i + 1 >= len(text) or text[i + 1] not in escapes:
                raise ExpositionError(f"bad escape in {text!r}")
            out.append(escapes[text[i + 1]])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _parse_labels(line: str, i: int) -> tuple[tuple[tuple[str, str], ...], int]:
    """Parse `name="value",...}` from line[i:]; return labels and the index after `}`."""
    labels: list[tuple[str, str]] = []
    while True:
        m = re.compile(_LABEL).match(line, i)
        if not m or line[m.end() : m.end() + 2] != '="':
            raise ExpositionError(f"bad label at {i}: {line!r}")
        name, i = m.group(0), m.end() + 2
        raw: list[str] = []
        while True:
            if i >= len(line):
                raise ExpositionError(f"unterminated label value: {line!r}")
            ch = line[i]
            if ch == "\n":
                raise ExpositionError(f"raw newline in label value: {line!r}")
            if ch == "\\":
                raw.append(line[i : i + 2])
                i += 2
                continue
            if ch == '"':
                i += 1
                break
            raw.append(ch)
            i += 1
        if any(n == name for n, _ in labels):
            raise ExpositionError(f"duplicate label {name}: {line!r}")
        labels.append((name, _unescape("".join(raw), _ESCAPES)))
        if line[i : i + 1] == ",":
            i += 1
            continue
        if line[i : i + 1] == "}":
            return tuple(sorted(labels)), i + 1
        raise ExpositionError(f"expected , or }} at {i}: {line!r}")


def _parse_value(text: str) -> float:
    if text in ("NaN", "+Inf", "-Inf"):
        return float(text.lower().replace("+", ""))
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?", text):
        raise ExpositionError(f"bad value {text!r}")
    return float(text)


def parse(text: str) -> dict[str, ParsedFamily]:
    """Parse exposition text, refusing anything the 0.0.4 format (or good practice) forbids.

    Families must be declared by HELP then TYPE before their samples, once each; samples
    of a family must be contiguous; no (name, labels) may repeat; no timestamps.
    """
    if not text.endswith("\n"):
        raise ExpositionError("exposition must end with a newline")
    families: dict[str, ParsedFamily] = {}
    current: str | None = None
    for line in text[:-1].split("\n"):
        if not line:
            raise ExpositionError("blank line")
        if line.startswith("#"):
            m = _COMMENT.fullmatch(line)
            if not m:
                raise ExpositionError(f"bad comment line {line!r}")
            kind, name, rest = m.groups()
            fam = families.setdefault(name, ParsedFamily())
            if kind == "HELP":
                if fam.help is not None or fam.type is not None or fam.samples:
                    raise ExpositionError(f"second or late HELP for {name}")
                fam.help = _unescape(rest, _HELP_ESCAPES)
                current = name
            else:
                if fam.type is not None or fam.samples or current != name:
                    raise ExpositionError(f"second or misplaced TYPE for {name}")
                if rest not in ("counter", "gauge", "histogram"):
                    raise ExpositionError(f"unexpected type {rest!r} for {name}")
                fam.type = rest
            continue
        m = _SAMPLE_HEAD.match(line)
        if not m:
            raise ExpositionError(f"bad sample line {line!r}")
        name, i = m.group(1), m.end()
        labels: tuple[tuple[str, str], ...] = ()
        if m.group(2):
            labels, i = _parse_labels(line, i)
        if line[i : i + 1] != " " or " " in line[i + 1 :]:
            raise ExpositionError(f"expected exactly one value (no timestamp): {line!r}")
        family_name = name
        if current is not None and families[current].type == "histogram":
            # A histogram's samples: NAME_bucket{le=...}, NAME_sum, NAME_count.
            suffix = name[len(current) :] if name.startswith(current) else ""
            if suffix not in ("_bucket", "_sum", "_count"):
                raise ExpositionError(f"sample {name} is not one of histogram {current}'s")
            if (suffix == "_bucket") != any(k == "le" for k, _ in labels):
                raise ExpositionError(f"le label on {name}: only and always on _bucket")
            family_name = current
            labels = ((" sample", suffix), *labels)
        if family_name != current or families[family_name].type is None:
            raise ExpositionError(f"sample {name} outside its declared family block")
        if labels in families[family_name].samples:
            raise ExpositionError(f"duplicate series {name}{labels}")
        families[family_name].samples[labels] = _parse_value(line[i + 1 :])
    return families


def _value(fams: dict[str, ParsedFamily], name: str, **labels: str) -> float:
    return fams[PREFIX + name].samples[tuple(sorted(labels.items()))]


# -- the parser itself must be strict, or the tests below prove nothing ----------------


@pytest.mark.parametrize(
    "bad",
    [
        "# TYPE a counter\na 1\n",  # TYPE without HELP
        "# HELP a x\n# TYPE a counter\na 1\n# HELP a x\n",  # second HELP
        "# HELP a x\n# TYPE a counter\na 1\na 2\n",  # duplicate series
        '# HELP a x\n# TYPE a gauge\na{l="x\\t"} 1\n',  # undefined escape
        '# HELP a x\n# TYPE a gauge\na{l="x} 1\n',  # unterminated value
        "# HELP a x\n# TYPE a gauge\nb 1\n",  # sample outside its family
        "# HELP a x\n# TYPE a gauge\na 1 1700000000\n",  # timestamp
        "# HELP a x\n# TYPE a gauge\na 1",  # no final newline
        "# HELP a x\n# TYPE a gauge\na one\n",  # not a number
    ],
)
def test_parser_rejects(bad: str) -> None:
    with pytest.raises(ExpositionError):
        parse(bad)


# -- render ------------------------------------------------------------------------------


def test_sample_values() -> None:
    fams = parse(render(SAMPLE))
    assert _value(fams, "generation") == 2
    assert _value(fams, "reloads_total") == 7
    assert _value(fams, "workers_wanted") == 2
    assert _value(fams, "uptime_seconds") == 12.5
    assert _value(fams, "ephemeral_ports") == 28232

    w = {"worker": "0"}
    assert _value(fams, "accepted_total", **w) == 10
    assert _value(fams, "tunnels_opened_total", **w) == 9
    assert _value(fams, "tunnels_closed_total", **w) == 8
    assert _value(fams, "bytes_up_total", **w) == 100
    assert _value(fams, "bytes_down_total", **w) == 2000
    assert _value(fams, "handshake_failures_total", reason="auth_failed", **w) == 1
    assert _value(fams, "replies_total", code="0", **w) == 8
    assert _value(fams, "replies_total", code="5", **w) == 1
    assert _value(fams, "egress_errors_total", kind="connect:eaddrnotavail", **w) == 3
    assert _value(fams, "egress_retries_total", **w) == 3
    assert _value(fams, "egress_rescued_total", **w) == 2
    assert _value(fams, "egress_exhausted_total", **w) == 1
    assert _value(fams, "stats_dropped_lines_total", **w) == 0
    assert _value(fams, "open_tunnels", **w) == 1
    assert _value(fams, "open_sessions", **w) == 2
    assert _value(fams, "worker_up", **w) == 1
    assert _value(fams, "worker_restarts_total", **w) == 0

    ip = {"egress_ip": "192.0.2.1"}
    assert _value(fams, "egress_open_sockets", **ip) == 3
    assert _value(fams, "egress_connects_attempted_total", **ip) == 10
    assert _value(fams, "egress_connects_succeeded_total", **ip) == 9
    assert _value(fams, "egress_connect_failures_total", errno="eaddrnotavail", **ip) == 1
    assert _value(fams, "egress_ip_exhausted_total", **ip) == 1
    assert _value(fams, "egress_ip_retries_total", **ip) == 1
    assert _value(fams, "egress_ip_rescued_total", **ip) == 0

    pair = {"egress_ip": "192.0.2.1", "target": "198.51.100.3:443"}
    assert _value(fams, "egress_target_open_sockets", **pair) == 3
    assert _value(fams, "egress_target_recent_closes", **pair) == 5
    assert _value(fams, "egress_target_pressure", **pair) == 0.0003
    assert _value(fams, "egress_target_exhausted_total", **pair) == 1

    assert _value(fams, "time_wait_sockets") == 5
    assert _value(fams, "time_wait_pair_sockets", **pair) == 5
    assert _value(fams, "time_wait_pair_pressure", **pair) == 0.0002


def test_every_family_declared_once_with_help_and_type() -> None:
    text = render(SAMPLE)
    fams = parse(text)  # the parser already refuses a second HELP or TYPE
    expected = {PREFIX + name for name in BRIEF_NAMES.split()}
    assert set(fams) == expected
    assert len(FAMILIES) == len(expected)
    for name, fam in fams.items():
        assert name.startswith("socksd_")
        assert fam.help
        assert (fam.type == "counter") == name.endswith("_total"), name
        assert text.count(f"# HELP {name} ") == 1
        assert text.count(f"# TYPE {name} ") == 1


def test_families_with_several_samples_share_one_block() -> None:
    agg = copy.deepcopy(SAMPLE)
    second = copy.deepcopy(agg["workers"][0])
    second.update(slot=1, pid=12, alive=False, restarts=4)
    agg["workers"].append(second)
    fams = parse(render(agg))
    assert fams["socksd_accepted_total"].samples == {
        (("worker", "0"),): 10,
        (("worker", "1"),): 10,
    }
    assert _value(fams, "worker_up", worker="1") == 0
    assert _value(fams, "worker_restarts_total", worker="1") == 4
    assert len(fams["socksd_replies_total"].samples) == 4


def test_label_values_are_escaped() -> None:
    nasty = 'a\\b"c\nd'
    agg = copy.deepcopy(SAMPLE)
    agg["workers"][0]["counters"] = {**COUNTERS, "handshake_failures": {nasty: 7}}
    agg["egress"]["targets"][0]["target"] = nasty
    text = render(agg)
    assert 'reason="a\\\\b\\"c\\nd"' in text
    fams = parse(text)
    assert _value(fams, "handshake_failures_total", worker="0", reason=nasty) == 7
    assert _value(fams, "egress_target_exhausted_total", egress_ip="192.0.2.1", target=nasty) == 1
    assert escape_label_value(nasty) == 'a\\\\b\\"c\\nd'


@pytest.mark.parametrize("aggregate", [EMPTY, {}], ids=["empty-shape", "no-keys"])
def test_empty_aggregate_renders_families_without_samples(aggregate: dict[str, Any]) -> None:
    fams = parse(render(aggregate))
    assert set(fams) == {PREFIX + f.name for f in FAMILIES}
    with_samples = {n for n, f in fams.items() if f.samples}
    if aggregate:
        assert with_samples == {
            "socksd_ephemeral_ports",
            "socksd_time_wait_sockets",
        }
    else:
        assert with_samples == set()


def test_reload_overlap_keeps_newest_generation_per_slot() -> None:
    agg = copy.deepcopy(SAMPLE)
    old = copy.deepcopy(agg["workers"][0])
    old.update(gen=1, pid=5, counters={**COUNTERS, "accepted": 999})
    agg["workers"].insert(0, old)
    fams = parse(render(agg))  # no duplicate series
    assert fams["socksd_accepted_total"].samples == {(("worker", "0"),): 10}


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (10**15, "1000000000000000"),
        (True, "1"),
        (12.5, "12.5"),
        (1e-05, "1e-05"),
        (math.nan, "NaN"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
    ],
)
def test_format_value(value: float, text: str) -> None:
    assert format_value(value) == text
    parsed = _parse_value(text)
    assert parsed == float(value) or (math.isnan(parsed) and math.isnan(value))


def test_non_numeric_value_is_a_bug() -> None:
    agg = copy.deepcopy(SAMPLE)
    agg["workers"][0]["counters"] = {**COUNTERS, "accepted": "10"}
    with pytest.raises(TypeError, match="accepted|'10'"):
        render(agg)


def test_dns_figures_per_worker_with_a_cumulative_latency_histogram() -> None:
    dns = {
        "lookups": 7,
        "hits": 90,
        "misses": 7,
        "coalesced": 3,
        "stale": 1,
        "failures": {"dns_nxdomain": 2, "dns_timeout": 1},
        "latency_ms": {"1": 2, "5": 3, "inf": 2},
        "latency_s_total": 12.5,
    }
    agg = {"workers": [{"slot": 0, "gen": 1, "alive": True, "counters": {"dns": dns}}]}
    fams = parse(render(agg))
    w = {"worker": "0"}
    assert _value(fams, "dns_lookups_total", **w) == 7
    assert _value(fams, "dns_cache_hits_total", **w) == 90
    assert _value(fams, "dns_cache_misses_total", **w) == 7
    assert _value(fams, "dns_coalesced_total", **w) == 3
    assert _value(fams, "dns_stale_answers_total", **w) == 1
    assert _value(fams, "dns_failures_total", reason="dns_nxdomain", **w) == 2
    hist = fams[PREFIX + "dns_lookup_seconds"]
    assert hist.type == "histogram"
    buckets = {
        dict(labels)["le"]: value
        for labels, value in hist.samples.items()
        if dict(labels)[" sample"] == "_bucket"
    }
    assert buckets == {"0.001": 2, "0.005": 5, "+Inf": 7}  # cumulative, seconds
    totals = {dict(k)[" sample"]: v for k, v in hist.samples.items() if "le" not in dict(k)}
    assert totals == {"_sum": 12.5, "_count": 7}
