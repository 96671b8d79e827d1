"""OAuth2 client credentials (RFC 6749 §4.4) and bearer-token checks for the sandbox Manager.

Tokens are opaque random strings. Postgres holds their SHA-256 and expiry, so tokens survive a
restart and are shared by replicas; a process-local cache answers the hot path without a query.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import unquote_plus

from workflow_orchestrator.sandbox.store import Store, sha256

# Compared against when the client is unknown, so a wrong id costs the same as a wrong secret.
_DUMMY_HASH = sha256("no such client")
_CACHE_LIMIT = 100_000


@dataclass(frozen=True)
class IssuedToken:
    access_token: str
    expires_in: int


class OAuthError(Exception):
    """An RFC 6749 §5.2 error: `error` code, HTTP status, and a description."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


def basic_credentials(header: str) -> tuple[str, str] | None:
    """(client_id, client_secret) from an `Authorization: Basic ...` header, else None.
    RFC 6749 §2.3.1: both parts are form-urlencoded before base64."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise OAuthError("invalid_client", "malformed HTTP Basic credentials", 401) from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise OAuthError("invalid_client", "malformed HTTP Basic credentials", 401)
    return unquote_plus(client_id), unquote_plus(secret)


def bearer_token(header: str | None) -> str | None:
    """The token of `Bearer <t>` or of the older `Bearer access_token=<t>` form."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    value = value.strip()
    if value.startswith("access_token="):
        value = value[len("access_token="):].strip()
    return value or None


class Tokens:
    """Issues and verifies bearer tokens."""

    def __init__(self, store: Store, ttl_seconds: int) -> None:
        self._store = store
        self._ttl = ttl_seconds
        self._cache: dict[str, float] = {}  # token -> expiry (Unix time)

    async def issue(self, client_id: str, client_secret: str) -> IssuedToken:
        """A new token for valid client credentials, else OAuthError(invalid_client)."""
        stored = await self._store.client_secret_sha256(client_id)
        ok = hmac.compare_digest(stored or _DUMMY_HASH, sha256(client_secret))
        if stored is None or not ok:
            raise OAuthError("invalid_client", "unknown client or wrong secret", 401)
        token = secrets.token_urlsafe(32)
        expires = datetime.now(UTC) + timedelta(seconds=self._ttl)
        await self._store.insert_token(sha256(token), client_id, expires)
        self._remember(token, expires.timestamp())
        return IssuedToken(token, self._ttl)

    async def valid(self, token: str) -> bool:
        """True when `token` was issued here (or by a replica) and has not expired."""
        expiry = self._cache.get(token)
        if expiry is None:
            expiry = await self._store.token_expiry(sha256(token))
            if expiry is None:
                return False
            self._remember(token, expiry)
        if expiry <= time.time():
            self._cache.pop(token, None)
            return False
        return True

    def _remember(self, token: str, expiry: float) -> None:
        if len(self._cache) >= _CACHE_LIMIT:
            now = time.time()
            self._cache = {t: e for t, e in self._cache.items() if e > now}
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
        self._cache[token] = expiry
