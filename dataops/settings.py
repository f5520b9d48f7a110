"""dataops.yaml, read once into typed objects and passed down.

Lookup order for the file: `--config`, then `DATAOPS_CONFIG`, then `./dataops.yaml`.
Values may use `${VAR}` or `${VAR:-default}`, so secrets live in the environment and
never in the file. Unknown keys, missing variables and bad values are errors that name
the key, because a typo in a safety setting must never be silently ignored.
"""

from __future__ import annotations

import os
import re
from enum import Enum
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from dataops.dsn import Dsn
from dataops.errors import BadInput, ConfigError
from dataops.redact import redact, register_secret

DEFAULT_CONFIG_NAME = "dataops.yaml"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,62}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Role(str, Enum):
    PRODUCTION = "production"
    STAGING = "staging"
    DEVELOPMENT = "development"


class Environment(Strict):
    role: Role
    database_url: Dsn
    description: str | None = None
    name: str = Field(default="", exclude=True)  # filled from the mapping key

    @property
    def is_production(self) -> bool:
        return self.role is Role.PRODUCTION


class StorageSettings(Strict):
    url: str = Field(description="s3://bucket/prefix or file:///absolute/path")
    endpoint_url: str | None = Field(default=None, description="for MinIO, R2 and other S3-compatible stores")
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    server_side_encryption: Literal["AES256", "aws:kms"] | None = None
    kms_key_id: str | None = None
    multipart_chunk_mb: int = Field(default=8, ge=5, le=512)
    max_concurrency: int = Field(default=4, ge=1, le=32)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme == "s3":
            if not parts.netloc:
                raise ValueError("s3 URL needs a bucket: s3://bucket/prefix")
        elif parts.scheme == "file":
            if not parts.path.startswith("/"):
                raise ValueError("file URL needs an absolute path: file:///var/backups/dataops")
        else:
            raise ValueError(f"scheme '{parts.scheme or v}' is not supported; use s3://bucket/prefix or file:///path")
        return v.rstrip("/")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and urlsplit(v).scheme not in ("http", "https"):
            raise ValueError("must be an http(s) URL, e.g. http://127.0.0.1:9000")
        return v

    @model_validator(mode="after")
    def _kms(self) -> "StorageSettings":
        if self.kms_key_id and self.server_side_encryption != "aws:kms":
            raise ValueError("kms_key_id needs server_side_encryption: aws:kms")
        return self

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def bucket(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def prefix(self) -> str:
        return urlsplit(self.url).path.strip("/")


class BackupSettings(Strict):
    keep_last: int = Field(default=7, ge=1, description="always keep this many newest backups")
    keep_days: int = Field(default=30, ge=0, description="and every backup younger than this")
    compression: Literal["zstd", "pg_dump"] = Field(
        default="zstd", description="zstd: pg_dump -Z0 compressed by multi-threaded zstd; pg_dump: its own gzip")
    compression_level: int = Field(default=3, ge=1, le=19)
    compression_threads: int = Field(default=0, ge=0, le=64, description="0: one per core")
    scratch_database_url: Dsn | None = Field(
        default=None, description="server for scratch databases (verify); default: the environment's own server"
    )


class PostgresSettings(Strict):
    bin_dir: Path | None = Field(default=None, description="folder with pg_dump/pg_restore matching the server")
    connect_timeout: int = Field(default=10, ge=1, le=300)


class PrefectSettings(Strict):
    api_url: str | None = Field(default=None, description="Prefect API; default: a temporary local one")


class Settings(Strict):
    environments: dict[str, Environment]
    storage: StorageSettings
    backups: BackupSettings = BackupSettings()
    postgres: PostgresSettings = PostgresSettings()
    prefect: PrefectSettings = PrefectSettings()
    source: str | None = Field(default=None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        """A section with every line commented out reads as null: treat it as absent."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k not in ("environments", "storage"))}
        return data

    @field_validator("environments", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        if not isinstance(v, dict) or not v:
            raise ValueError("needs at least one environment, e.g. production: {role: production, database_url: ...}")
        out = {}
        for name, body in v.items():
            if not isinstance(name, str) or not _NAME.match(name):
                raise ValueError(f"environment name {name!r} must start with a letter and hold only letters, digits, _ or -")
            if isinstance(body, dict):
                body = {**body, "name": name}
            out[name] = body
        return out

    def env(self, name: str) -> Environment:
        try:
            return self.environments[name]
        except KeyError:
            known = ", ".join(sorted(self.environments)) or "none"
            raise BadInput(f"unknown environment '{name}' (known: {known}); add it under environments: in {self.source or DEFAULT_CONFIG_NAME}") from None

    def by_role(self, role: Role) -> list[Environment]:
        return [e for e in self.environments.values() if e.role is role]


# -- loading --------------------------------------------------------------------------

def config_path(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit)
    if os.environ.get("DATAOPS_CONFIG"):
        return Path(os.environ["DATAOPS_CONFIG"])
    return Path.cwd() / DEFAULT_CONFIG_NAME


def _interpolate(node: Any, path: str, env: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, f"{path}.{k}" if path else str(k), env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]", env) for i, v in enumerate(node)]
    if isinstance(node, str):
        def sub(m: re.Match) -> str:
            var, default = m.group(1), m.group(2)
            if var in env:
                register_secret(env[var]) if _looks_secret(path, var) else None
                return env[var]
            if default is not None:
                return default
            raise ConfigError(f"{path}: environment variable {var} is not set; export {var}=... or give a default as ${{{var}:-value}}")
        return _ENV_REF.sub(sub, node)
    return node


def _looks_secret(path: str, var: str) -> bool:
    text = f"{path} {var}".lower()
    return any(w in text for w in ("password", "secret", "token", "key", "url", "dsn"))


def _known_keys() -> set[str]:
    keys: set[str] = set()
    for model in (Settings, Environment, StorageSettings, BackupSettings, PostgresSettings, PrefectSettings):
        keys.update(model.model_fields)
    return keys


def _format_validation_error(err: ValidationError, source: str) -> str:
    import difflib

    # A typo shows up twice (unknown key + missing key); the unknown key is the useful one.
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"] if p != "name")
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(first["loc"][-1]), sorted(_known_keys()), n=1)
        msg = f"unknown key; did you mean '{close[0]}'?" if close else "unknown key; remove it or check its spelling"
    elif first["type"] == "missing":
        msg = "is required"
    msg = msg.removeprefix("Value error, ")
    more = len(err.errors()) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return redact(f"{source}: {loc or 'top level'}: {msg}{tail}")


def parse_settings(data: Any, source: str = DEFAULT_CONFIG_NAME, env: dict[str, str] | None = None) -> Settings:
    if data is None:
        raise ConfigError(f"{source} is empty; see README.md for an example")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of keys (environments:, storage:, ...)")
    try:
        data = _interpolate(data, "", dict(os.environ) if env is None else env)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err.message}") from None
    try:
        settings = Settings.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    if settings.storage.secret_access_key:
        register_secret(settings.storage.secret_access_key.get_secret_value())
    return settings.model_copy(update={"source": source})


def load_settings(path: str | os.PathLike | None = None) -> Settings:
    p = config_path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} not found; pass --config PATH, set DATAOPS_CONFIG, or run `dataops dev up` to write one")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{where}; fix the syntax") from None
    return parse_settings(data, source=str(p))
