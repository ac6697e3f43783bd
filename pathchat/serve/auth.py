"""HTTP Basic authentication in front of every route of the app (Gradio's, the tiles', the assets').

One ASGI middleware wraps the whole application, so no route can be added that forgets the check;
Gradio's own login form would cover only Gradio's routes. Browsers, `gradio_client` (`headers=`)
and Playwright (`http_credentials=`) all speak Basic auth. Put TLS in front when serving beyond
this machine: Basic credentials travel in clear text otherwise.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import stat
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

__all__ = ["AuthFileError", "BasicAuthMiddleware", "load_auth_file"]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class AuthFileError(ValueError):
    """The auth file is unreadable or malformed (the message names the file and the line)."""


def load_auth_file(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """Users and password digests from a file of `user:password` lines (`#` starts a comment).

    Returns:
        {user: sha256(password)}: only digests stay in memory.

    Raises:
        AuthFileError: missing file, a line without `:`, an empty user or password, or no users.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        mode = p.stat().st_mode
    except OSError as e:
        raise AuthFileError(f"{p}: cannot read auth file: {e}") from e
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("%s: auth file is readable by other users; chmod 600 it", p)
    users: dict[str, bytes] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise AuthFileError(f"{p}:{n}: expected `user:password`")
        users[user.strip()] = hashlib.sha256(password.encode()).digest()
    if not users:
        raise AuthFileError(f"{p}: no `user:password` lines")
    return users


class BasicAuthMiddleware:
    """Answers 401 (HTTP) or closes with 1008 (WebSocket) unless the request carries valid credentials."""

    def __init__(self, app: ASGIApp, users: dict[str, bytes], realm: str = "PathChat"):
        self.app = app
        self.users = users
        self.realm = realm

    def _authorised(self, scope: Scope) -> bool:
        header = next((v for k, v in scope.get("headers", []) if k == b"authorization"), None)
        if header is None or header[:6].lower() != b"basic ":
            return False
        try:
            user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        digest = hashlib.sha256(password.encode()).digest()
        expected = self.users.get(user, b"\0" * 32)  # compare even for unknown users: same timing
        return hmac.compare_digest(digest, expected) and user in self.users

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] not in ("http", "websocket") or self._authorised(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = b"authentication required"
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"www-authenticate", f'Basic realm="{self.realm}", charset="UTF-8"'.encode()),
                                (b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
