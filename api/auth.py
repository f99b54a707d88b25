"""Bearer-token authentication and the local daemon's generated token.

Tokens come from configuration (``QUICKFLOW_TOKENS="name:token,…"``, ``QUICKFLOW_ADMIN_TOKEN``).
A run belongs to the name of the token that created it; other tokens get 404 for it, the admin
token sees every run. With no token configured, a loopback-bound daemon generates one and
writes ``{url, token}`` to a user-only (0600) file that the CLI reads. Tokens are compared in
constant time and never logged.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request

from runtime.config import Settings
from runtime.errors import ConfigError, Unauthorized

__all__ = ["Principal", "TokenTable", "daemon_file", "is_loopback", "read_daemon_file", "write_daemon_file"]


@dataclass(frozen=True)
class Principal:
    name: str
    admin: bool = False

    @property
    def owner_filter(self) -> str | None:
        """The owner a query is limited to; None for the admin."""
        return None if self.admin else self.name


class TokenTable:
    def __init__(self, tokens: dict[str, str], admin_token: str | None) -> None:
        self._entries = [(token.encode(), Principal(name)) for token, name in tokens.items()]
        if admin_token:
            self._entries.append((admin_token.encode(), Principal("admin", admin=True)))

    @classmethod
    def from_settings(cls, settings: Settings, generated: str | None = None) -> TokenTable:
        admin = settings.admin_token.get_secret_value() if settings.admin_token else None
        table = cls(settings.token_table(), admin)
        if generated is not None:
            table._entries.append((generated.encode(), Principal("local", admin=True)))
        return table

    def __bool__(self) -> bool:
        return bool(self._entries)

    def authenticate(self, header: str | None) -> Principal:
        if not header:
            raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        presented = token.strip().encode()
        found: Principal | None = None
        for candidate, principal in self._entries:
            # Compare against every entry so timing does not reveal which prefix matched.
            if hmac.compare_digest(candidate, presented):
                found = principal
        if found is None:
            raise Unauthorized("invalid bearer token")
        return found


def principal(request: Request) -> Principal:
    """FastAPI dependency: the caller, or 401."""
    table: TokenTable = request.app.state.tokens
    return table.authenticate(request.headers.get("authorization"))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def daemon_file() -> Path:
    """Where the local daemon publishes its URL and generated token."""
    override = os.environ.get("QUICKFLOW_DAEMON_FILE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "quickflow" / "daemon.json"


def write_daemon_file(url: str, token: str) -> Path:
    path = daemon_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Create with 0600 from the start: the token is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"url": url, "token": token, "pid": os.getpid()}, fh)
    os.chmod(path, 0o600)
    return path


def read_daemon_file() -> dict[str, Any] | None:
    try:
        data = json.loads(daemon_file().read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def generate_token() -> str:
    return "qf_" + secrets.token_urlsafe(32)


def check_bind(settings: Settings, host: str) -> None:
    """Refuse to expose an unauthenticated service beyond loopback."""
    if not is_loopback(host) and not (settings.tokens or settings.admin_token):
        raise ConfigError(
            f"refusing to bind {host} without authentication: set QUICKFLOW_TOKENS or QUICKFLOW_ADMIN_TOKEN"
        )
