"""JSON encoding on the hot path: orjson, with the standard library as the exact fallback.

Encoding a decision (the record snapshot and every message body, ~5 KB per step) happens three times
per step: for the ledger, for the PUT and for the publishes. orjson does it several times faster.
Decoding stays with the standard library: orjson turns integers beyond 64 bits into floats, and a
payload's unknown fields must pass through unchanged (SPEC §4.1)."""

from __future__ import annotations

import json
from typing import Any

import orjson

_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON; integers beyond 64 bits, which orjson refuses, go through the standard
    library. (NaN and infinities, which orjson writes as null, are refused when messages are parsed.)"""
    try:
        return orjson.dumps(value, default=str, option=_OPTIONS)
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":"), default=str).encode()


def dumps_str(value: Any) -> str:
    return dumps(value).decode()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads(raw: bytes | str) -> Any:
    """Strict JSON (RFC 8259: no NaN or Infinity), exact integers; raises ValueError."""
    return json.loads(raw, parse_constant=_refuse_constant)
