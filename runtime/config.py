"""Server configuration: one file plus environment variables.

Pydantic lives here because configuration is an edge. The rest of the runtime receives the
frozen values it needs (``Limits``, a price table, resolved profiles), never this model.

Sources, later wins: built-in defaults < the config file (``QUICKFLOW_CONFIG`` or
``<data_dir>/config.json``) < environment variables (``QUICKFLOW_*``; nested keys use ``__``,
e.g. ``QUICKFLOW_LIMITS__CONCURRENCY=8``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigError
from .limits import Limits

__all__ = ["AgentProfile", "AnthropicConfig", "ClaudeCodeConfig", "ModelPrice", "Settings", "load_settings"]


class ModelPrice(BaseModel):
    """USD per million tokens."""

    input: float
    output: float
    cache_read: float = 0.0
    cache_write: float = 0.0


class AgentProfile(BaseModel):
    """A named agent profile, selected in scripts with ``agent(..., {agentType})``."""

    system_prompt: str | None = None
    model: str | None = None
    backend: str | None = None
    tools: list[str] = Field(default_factory=list)


class AnthropicConfig(BaseModel):
    api_key: SecretStr | None = None
    base_url: str | None = None
    max_retries: int = 4
    max_retry_wait_s: float = 60.0
    max_tokens: int = 8192


class ClaudeCodeConfig(BaseModel):
    """The claude-code backend (optional extra): each agent is a Claude Code session."""

    cli_path: str | None = None  # a pinned `claude` binary; default: the one the SDK finds
    workspace: str | None = None  # default working directory when a run names none
    home: str | None = None  # HOME for the CLI (isolates ~/.claude)
    tools: list[str] | None = None  # tool allowlist; default Read, Grep, Glob
    max_turns: int | None = None
    worktree_root: str | None = None  # where `isolation: 'worktree'` creates worktrees


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QUICKFLOW_", env_nested_delimiter="__", extra="ignore")

    data_dir: Path = Path(".quickflow")
    host: str = "127.0.0.1"
    port: int = 8765
    # "name:token,name:token"; each name owns the runs created with its token.
    tokens: SecretStr | None = None
    admin_token: SecretStr | None = None
    max_body_bytes: int = 2 * 1024 * 1024
    workflows_dir: Path | None = None
    default_backend: Literal["simulate", "anthropic", "claude-code"] | None = None
    default_model: str = "sonnet"
    # A stdlib frozen dataclass: pydantic validates it here, the runtime uses it as is.
    limits: Limits = Field(default_factory=Limits)
    models: dict[str, str] = Field(default_factory=dict)
    prices: dict[str, ModelPrice] = Field(default_factory=dict)
    profiles: dict[str, AgentProfile] = Field(default_factory=dict)
    anthropic: AnthropicConfig = Field(default_factory=AnthropicConfig)
    claude_code: ClaudeCodeConfig = Field(default_factory=ClaudeCodeConfig)

    def backend_name(self) -> str:
        """The backend runs use when they do not name one: configured, else by API key presence."""
        if self.default_backend:
            return self.default_backend
        key = self.anthropic.api_key or _env_secret("ANTHROPIC_API_KEY")
        return "anthropic" if key else "simulate"

    def token_table(self) -> dict[str, str]:
        """token -> owner name. Raises ConfigError on a malformed ``QUICKFLOW_TOKENS``."""
        table: dict[str, str] = {}
        if self.tokens is None:
            return table
        for entry in self.tokens.get_secret_value().split(","):
            entry = entry.strip()
            if not entry:
                continue
            name, sep, token = entry.partition(":")
            if not sep or not name or not token:
                raise ConfigError("QUICKFLOW_TOKENS must look like 'name:token,name:token'")
            table[token] = name
        return table


def _env_secret(name: str) -> SecretStr | None:
    value = os.environ.get(name)
    return SecretStr(value) if value else None


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from defaults, the config file, the environment, then explicit overrides."""
    path = config_file or (Path(os.environ["QUICKFLOW_CONFIG"]) if os.environ.get("QUICKFLOW_CONFIG") else None)
    file_values: dict[str, Any] = {}
    if path is not None:
        try:
            file_values = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        if not isinstance(file_values, dict):
            raise ConfigError(f"config file {path} must hold a JSON object")
    env_settings = Settings()
    merged = _deep_merge(file_values, env_settings.model_dump(exclude_unset=True, exclude_defaults=True))
    merged = _deep_merge(merged, {k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings.model_validate(merged)
    except ValueError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
