"""structlog set-up: JSON or console, per-message context from contextvars, secrets redacted."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = re.compile(r"pass(word)?|secret|token|authorization|api[_-]?key|credential", re.I)
_URL_PASSWORD = re.compile(r"([a-z][a-z0-9+.-]*://[^:/@\s]*):[^@/\s]*@", re.I)
_BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.I)
_FORM_SECRET = re.compile(r"((?:client_secret|access_token|password)=)[^&\s\"']+", re.I)


def redact_text(text: str) -> str:
    """Mask passwords in URLs, bearer tokens and secret form fields inside free text."""
    text = _URL_PASSWORD.sub(r"\1:***@", text)
    text = _BEARER.sub(r"\1***", text)
    return _FORM_SECRET.sub(r"\1***", text)


def _redact(value: Any, key: str = "") -> Any:
    if key and _SECRET_KEYS.search(key) and value not in (None, "", False):
        return "***"
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    return value


def redact_processor(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for k in list(event_dict):
        event_dict[k] = _redact(event_dict[k], k if k != "event" else "")
    return event_dict


def configure(level: str = "info", fmt: str = "json", *, cache: bool = False) -> None:
    """Configure structlog and the stdlib root logger (aio-pika, asyncpg) to one stream.

    cache: each module's logger is built on its first use and kept, instead of being rebuilt
    through structlog's lazy proxy at every call (~1% of a step's CPU). For a process configured
    once (`run`); a process that reconfigures logging (the tests) must leave it off."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (structlog.processors.JSONRenderer() if fmt == "json"
                     else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, redact_processor, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=cache,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=renderer,
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(), structlog.processors.format_exc_info,
                           redact_processor],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    for noisy in ("aiormq", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))
