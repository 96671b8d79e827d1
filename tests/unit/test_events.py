"""Event-log texts and time arithmetic (SPEC §5.1, §4.1)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from workflow_orchestrator.domain.events import (
    elapsed_since,
    format_elapsed,
    iso,
    parse_time,
    prefix,
    rfc1123,
    round_half_away,
)

MINUTE, HOUR, DAY, WEEK = 60, 3600, 86400, 604800


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "<unknown>"),
        (0, "0 second(s)"),
        (1, "1 second(s)"),  # "(s)" even for 1
        (0.4, "0 second(s)"),
        (0.5, "1 second(s)"),
        (2.5, "3 second(s)"),  # half away from zero, not banker's (round(2.5) == 2)
        (59.4, "59 second(s)"),
        (59.6, "60 second(s)"),  # unit chosen on the unrounded value
        (60, "1 minute(s)"),
        (89, "1 minute(s)"),
        (90, "2 minute(s)"),
        (150, "3 minute(s)"),  # 2.5 min
        (HOUR - 1, "60 minute(s)"),
        (HOUR, "1 hour(s)"),
        (1.5 * HOUR, "2 hour(s)"),
        (2.5 * HOUR, "3 hour(s)"),
        (DAY - 1, "24 hour(s)"),
        (DAY, "1 day(s)"),
        (3.5 * DAY, "4 day(s)"),
        (WEEK - 1, "7 day(s)"),
        (WEEK, "1 week(s)"),
        (2.5 * WEEK, "3 week(s)"),
        (52 * WEEK, "52 week(s)"),
    ],
)
def test_format_elapsed(seconds: float | None, text: str) -> None:
    assert format_elapsed(seconds) == text


def test_negative_elapsed_is_clamped_to_zero() -> None:
    # clock skew between replicas must not print "-3 second(s)"
    assert format_elapsed(-3) == "0 second(s)"


@pytest.mark.parametrize(
    ("x", "n"),
    [(0.5, 1), (1.5, 2), (2.5, 3), (2.4999, 2), (-0.5, -1), (-2.5, -3), (0.0, 0), (7.0, 7)],
)
def test_round_half_away_from_zero(x: float, n: int) -> None:
    assert round_half_away(x) == n


def test_elapsed_since() -> None:
    now = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
    assert elapsed_since(now - timedelta(seconds=90), now) == "2 minute(s)"
    assert elapsed_since(now - timedelta(seconds=59.6), now) == "60 second(s)"
    assert elapsed_since(None, now) == "<unknown>"


@pytest.mark.parametrize(
    ("repo", "text"),
    [("acme/shop-deploy", "[OA][wf-1][acme/shop-deploy]"), (None, "[OA][wf-1][Unknown]"), ("", "[OA][wf-1][Unknown]")],
)
def test_prefix(repo: str | None, text: str) -> None:
    assert prefix("wf-1", repo) == text


TEN = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "value",
    [
        "Tue, 24 Nov 2026 10:00:00 GMT",  # RFC 1123, as scheduled_start_time is written
        "2026-11-24T10:00:00Z",
        "2026-11-24T10:00:00.000000Z",
        "2026-11-24T10:00:00+00:00",
        "2026-11-24T11:00:00+01:00",
        "2026-11-24T10:00:00",  # naive: taken as UTC
        datetime(2026, 11, 24, 10, 0),
        datetime(2026, 11, 24, 5, 0, tzinfo=timezone(timedelta(hours=-5))),
    ],
)
def test_parse_time_gives_aware_utc(value: str | datetime) -> None:
    parsed = parse_time(value)
    assert parsed == TEN
    assert parsed is not None and parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize("value", [None, "", "tomorrow", "Tue, 99 Nov 2026", 12345, ["2026-11-24"]])
def test_parse_time_of_absent_or_invalid_values_is_none(value: object) -> None:
    assert parse_time(value) is None


def test_iso_and_rfc1123_round_trip() -> None:
    dt = datetime(2026, 11, 24, 10, 0, 0, 250000, tzinfo=UTC)
    assert iso(dt) == "2026-11-24T10:00:00.250000Z"
    assert iso(datetime(2026, 11, 24, 11, 0, tzinfo=timezone(timedelta(hours=1)))) == "2026-11-24T10:00:00.000000Z"
    assert parse_time(iso(dt)) == dt
    assert rfc1123(TEN) == "Tue, 24 Nov 2026 10:00:00 GMT"
    assert parse_time(rfc1123(TEN)) == TEN
