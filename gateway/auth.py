"""API keys: who may call `/v1/*` (and `/metrics` when it is protected).

Keys come from `--api-key` (repeatable, or `DVD_GATEWAY_API_KEY`) and from `--api-key-file`
(one key per line, `#` comments and blank lines skipped), which is read again on SIGHUP so
keys rotate without a restart. With no key configured at all, the gateway is open as before.

A request carries `Authorization: Bearer <key>`, as the official OpenAI clients send their
`api_key`. The presented key is compared with every configured key by `hmac.compare_digest`,
all of them every time, so neither the answer's timing nor an early exit tells how much of a
key, or which key, matched. Keys themselves never reach a log line or a metric label: those
carry `key_id`, a short SHA-256 prefix that names a key without revealing it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable
from pathlib import Path

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import error_body

logger = logging.getLogger("dvd.gateway")

KEY_ID_CHARS = 8
"""Hex digits of SHA-256 in a key id: enough to tell a handful of keys apart, far too few to
help guess one."""
OPEN_PATHS = frozenset({"/health", "/ready"})
"""Probes stay open: orchestrators poll them without credentials."""


def key_id(key: str) -> str:
    """The name logs and metrics use for `key` (a hash prefix, never the key)."""
    return hashlib.sha256(key.encode()).hexdigest()[:KEY_ID_CHARS]


def read_key_file(path: str) -> tuple[str, ...]:
    """The keys in `path`: one a line, surrounding spaces, blank lines and `#` lines ignored."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))


class ApiKeys:
    """The keys a request may present; the file's part is replaced on `reload`."""

    def __init__(self, keys: Iterable[str] = (), key_file: str = "") -> None:
        self.fixed = tuple(keys)
        self.key_file = key_file
        self.from_file: tuple[str, ...] = read_key_file(key_file) if key_file else ()
        self._encoded = self._encode()

    @property
    def required(self) -> bool:
        """True when any key source is configured: a key file emptied later locks everyone
        out rather than opening the gateway."""
        return bool(self.fixed or self.key_file)

    def reload(self) -> None:
        """Re-reads the key file (SIGHUP); an unreadable file keeps the keys it had."""
        if not self.key_file:
            return
        try:
            self.from_file = read_key_file(self.key_file)
        except OSError as exc:
            logger.error("api keys: %s unreadable, keeping the old keys: %s", self.key_file, exc)
            return
        self._encoded = self._encode()
        logger.info("api keys: %d from %s", len(self.from_file), self.key_file)

    def _encode(self) -> tuple[tuple[bytes, str], ...]:
        return tuple((key.encode(), key_id(key)) for key in (*self.fixed, *self.from_file))

    def match(self, presented: str) -> str | None:
        """The key id of `presented` when it is a configured key, else None.

        Every key is compared, whatever matched before, so the time taken does not depend on
        which key (or how much of one) matched."""
        given = presented.encode()
        found = None
        for key, kid in self._encoded:
            if hmac.compare_digest(given, key):
                found = kid
        return found


def bearer_token(scope: Scope) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if there is one."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class AuthMiddleware:
    """Answers 401 `invalid_api_key` before anything else reads a protected request.

    It sits inside AccessMiddleware, so a refused request is still logged and counted, with
    its key id when a key was presented."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, protect_metrics: bool) -> None:
        self.app = app
        self.keys = keys
        self.protect_metrics = protect_metrics

    def protects(self, path: str) -> bool:
        if path in OPEN_PATHS:
            return False
        if path == "/metrics":
            return self.protect_metrics
        return path.startswith("/v1/") or path == "/v1"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.required or not self.protects(scope["path"]):
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        kid = self.keys.match(token) if token is not None else None
        record = scope.get("state", {}).get("record")
        if record is not None:
            record.key_id = kid or ("invalid" if token is not None else "none")
        if kid is not None:
            await self.app(scope, receive, send)
            return
        message = (
            "Incorrect API key provided"
            if token is not None
            else "Missing API key: send it as 'Authorization: Bearer <key>'"
        )
        response = JSONResponse(
            error_body(401, message, code="invalid_api_key"),
            status_code=401,
            headers={"www-authenticate": "Bearer"},
        )
        await response(scope, receive, send)
