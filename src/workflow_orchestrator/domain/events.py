"""Texts and time arithmetic of the event log (SPEC §5.1). Pure."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any

_UNITS = ((60, 1, "second"), (3600, 60, "minute"), (86400, 3600, "hour"), (604800, 86400, "day"))


def round_half_away(x: float) -> int:
    """Round half away from zero (59.5 -> 60, -0.5 -> -1), unlike Python's banker's round."""
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def format_elapsed(seconds: float | None) -> str:
    """`N second(s)` ... `N week(s)`: the first unit that fits the unrounded value."""
    if seconds is None:
        return "<unknown>"
    s = max(0.0, seconds)
    for limit, div, unit in _UNITS:
        if s < limit:
            return f"{round_half_away(s / div)} {unit}(s)"
    return f"{round_half_away(s / 604800)} week(s)"


def elapsed_since(start: datetime | None, now: datetime) -> str:
    return format_elapsed(None if start is None else (now - start).total_seconds())


def prefix(workflow_id: str, deployment_repo: Any) -> str:
    return f"[OA][{workflow_id}][{deployment_repo or 'Unknown'}]"


def parse_time(value: Any) -> datetime | None:
    """ISO-8601 or RFC 1123 text (or a datetime) -> aware UTC datetime; None if absent/invalid."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            try:
                dt = parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                return None
    else:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def iso(dt: datetime) -> str:
    """ISO-8601 UTC with a `Z` suffix."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rfc1123(dt: datetime) -> str:
    return format_datetime(dt.astimezone(UTC), usegmt=True)
