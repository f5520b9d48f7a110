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
from dataops.validation_settings import CustomCheck, ExpectValue, RowCountBounds, ValidationSettings

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
    compression_level: int = Field(default=3, ge=1, le=19, description="zstd level; 3 (with a larger match table): smaller than pg_dump's gzip")
    compression_threads: int = Field(default=0, ge=0, le=64, description="zstd workers; 0: one per core beside pg_dump's")
    jobs: int = Field(
        default=1, ge=1, le=64,
        description="1: one pg_dump -Fc stream (the default). N > 1: pg_dump -Fd -j N in one snapshot, each table's "
                    "file uploaded as its own object as soon as pg_dump closes it, restored with pg_restore -j N "
                    "(docs/backup.md: from what size it pays, and the local disk it needs)")
    local_dir: Path | None = Field(
        default=None, description="where a parallel backup (jobs > 1) keeps the table files pg_dump is writing until "
                                  "they are uploaded, and a parallel restore the whole uncompressed dump; default: "
                                  "the system's temporary folder")
    local_queue_mb: int = Field(
        default=256, ge=1, le=1048576,
        description="a parallel backup pauses pg_dump (SIGSTOP) while more than this many MiB of finished table files "
                    "wait for their upload, so the local disk holds at most this plus the files being written")
    scratch_database_url: Dsn | None = Field(
        default=None, description="server for scratch databases (verify); default: the environment's own server"
    )
    max_age_hours: int = Field(
        default=26, ge=1, description="the scheduled validation fails when no verified backup is younger than this "
                                      "(a nightly backup and its verification, plus two hours of slack)")
    freshness_roles: list[Role] = Field(
        default_factory=lambda: [Role.PRODUCTION],
        description="roles whose scheduled validation checks backup freshness; environments never backed up "
                    "(development) stay out of it")


class PostgresSettings(Strict):
    bin_dir: Path | None = Field(
        default=None, description="folder with pg_dump/pg_restore matching the server; {major} in it stands for the "
                                  "server's major version (/usr/lib/postgresql/{major}/bin), so servers of several "
                                  "versions each get theirs. Without it (or when it has the wrong version) the "
                                  "per-version folders of Debian, PGDG RPMs and Homebrew are searched, then PATH")
    connect_timeout: int = Field(default=10, ge=1, le=300)

    @field_validator("bin_dir")
    @classmethod
    def _placeholder(cls, v: Path | None) -> Path | None:
        """{major} is the one placeholder: a typo such as {version} would otherwise name a folder that
        never exists, and the tools would silently come from elsewhere."""
        if v is not None and re.search(r"[{}]", str(v).replace("{major}", "")):
            raise ValueError(f"'{v}': the only placeholder is {{major}} (the server's major version)")
        return v


class PrefectSettings(Strict):
    api_url: str | None = Field(default=None, description="Prefect API; default: the local one dataops keeps running "
                                "(docs/local-api.md), or a temporary one per command with local_api: false")
    local_api: bool = Field(default=True, description="without api_url: run flows against a local Prefect API started "
                            "once in the background and reused (false: Prefect's temporary API, ~10 s per command)")
    local_api_idle_s: int = Field(default=900, ge=1, le=7 * 86400,
                                  description="the local API stops after this many seconds without a command "
                                              "(DATAOPS_LOCAL_API_IDLE_S overrides)")
    crash_after_silence_s: int | None = Field(
        default=600, ge=60, le=86400,
        description="`dataops deploy`: a run whose heartbeats stop this long is marked Crashed (a host that died "
                    "runs no hook; Crashed then alerts, and rolls back a production migration); null: no such "
                    "automation. Must exceed the workers' PREFECT_FLOWS_HEARTBEAT_FREQUENCY (Prefect's default 180)")


_PG_DURATION = re.compile(r"^\d+\s*(us|ms|s|min|h|d)?$")


class MigrationSettings(Strict):
    path: Path = Field(default=Path("migrations"),
                       description="folder with env.py and versions/; relative to the config file unless absolute")
    lock_timeout: str = Field(default="5s", description="per revision: give up waiting for a table lock after this")
    statement_timeout: str = Field(default="15min", description="per revision: cancel a statement running longer")
    lock_retries: int = Field(default=3, ge=0, le=20, description="retries of a revision that hit lock_timeout")
    lock_retry_delay_s: float = Field(default=2.0, ge=0, le=600, description="first backoff; doubles per retry")
    approval_timeout_s: int = Field(default=3600, ge=1, description="production: how long a run waits for approval")
    approval_poll_s: int = Field(default=10, ge=1, le=300, description="how often a paused run looks for the answer")
    allow_auto_approve: bool = Field(default=False, description="demo stacks only: honor auto_approve=True")
    lint_small_table_rows: int | None = Field(
        default=None, ge=1, description="lint: lock findings on tables with fewer rows are warnings, not errors "
                                        "(off by default; a rewrite of a 10-row table is harmless)")

    @field_validator("lock_timeout", "statement_timeout")
    @classmethod
    def _duration(cls, v: str) -> str:
        if not _PG_DURATION.match(v.strip()):
            raise ValueError(f"{v!r} is not a PostgreSQL duration; use e.g. 500ms, 5s, 15min")
        return v.strip()


class AlertSettings(Strict):
    """The one channel every alert goes through: failed runs (a Prefect automation that
    `dataops deploy` creates) and the rollback's critical alert (sent directly)."""

    webhook_url: str | None = Field(default=None, description="generic or Slack incoming webhook; a secret")
    kind: Literal["webhook", "slack", "email"] = "webhook"
    timeout_s: float = Field(default=5.0, gt=0, le=60)
    sendgrid_api_key: SecretStr | None = Field(default=None, description="kind: email (Prefect's SendgridEmail block)")
    email_from: str | None = None
    email_to: list[str] = []

    @field_validator("webhook_url")
    @classmethod
    def _webhook(cls, v: str | None) -> str | None:
        if v is not None and urlsplit(v).scheme not in ("http", "https"):
            raise ValueError("must be an http(s) URL")
        if v and urlsplit(v).hostname not in ("127.0.0.1", "localhost"):
            register_secret(v)  # Slack-style webhook URLs carry their token in the path
        return v

    @model_validator(mode="after")
    def _complete(self) -> "AlertSettings":
        if self.kind == "email" and not (self.sendgrid_api_key and self.email_from and self.email_to):
            raise ValueError("kind: email needs sendgrid_api_key, email_from and email_to")
        if self.kind == "email" and self.sendgrid_api_key:
            register_secret(self.sendgrid_api_key.get_secret_value())
        return self

    @property
    def configured(self) -> bool:
        return bool(self.webhook_url) or self.kind == "email"


class ScheduleSettings(Strict):
    timezone: str = Field(default="UTC", description="IANA timezone of every cron schedule, e.g. Europe/Paris")
    staging_refresh_cron: str = Field(default="0 2 * * *", description="nightly staging refresh")

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {v!r}; use an IANA name like UTC or Europe/Paris") from None
        return v

    @field_validator("staging_refresh_cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError(f"{v!r} is not a 5-field cron expression, e.g. '0 2 * * *'")
        return v


_RULE_KINDS = ("faker", "template", "constant", "null", "hash", "partial", "shift_days", "keep",
               "noise", "regex", "choice", "generalize", "json_paths", "cases")
_KIND_NAMES = {"json_paths": "json"}  # field name -> the key written in dataops.yaml
_MASK_SEPARATORS = " ()+,./:@_-"  # partial masks keep these, so a phone number keeps its shape


class HashRule(Strict):
    length: int = Field(default=16, ge=8, le=64, description="hex characters kept (text columns)")


class PartialRule(Strict):
    keep_last: int = Field(default=4, ge=0, le=64, description="characters left readable at the end")
    mask: str = Field(default="*", min_length=1, max_length=1)

    @field_validator("mask")
    @classmethod
    def _mask(cls, v: str) -> str:
        if v.isalnum() or v in "\\&" or v in _MASK_SEPARATORS or not v.isprintable():
            raise ValueError(f"{v!r} cannot be a mask character; use one symbol such as * or #")
        return v


class NoiseRule(Strict):
    """Deterministic noise: numbers move by up to `bound` (absolute) or `percent` of the value,
    dates and timestamps by up to `bound` days. Symmetric, so sums and means stay close."""

    bound: float | None = Field(default=None, gt=0, description="largest move; days for dates and timestamps")
    percent: float | None = Field(default=None, gt=0, le=100, description="largest move as a percentage of the value")

    @model_validator(mode="after")
    def _one(self) -> "NoiseRule":
        if (self.bound is None) == (self.percent is None):
            raise ValueError("noise needs exactly one of bound (e.g. {bound: 10}) or percent (e.g. {percent: 5})")
        return self


class RegexRule(Strict):
    pattern: str = Field(min_length=1, description="PostgreSQL regular expression (ARE)")
    replace: str = Field(description="replacement; \\1 names a group")
    flags: str = Field(default="g", pattern=r"^[gicnsx]*$", description="regexp_replace flags; g: every match")


class ChoiceRule(Strict):
    values: list[str | int | float | bool] = Field(min_length=1, max_length=10_000)
    weights: list[int] | None = Field(default=None, description="a positive whole number per value")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, list):
            return {"values": v}
        if isinstance(v, dict) and "values" not in v and v:  # {DE: 3, FR: 1}: value -> weight
            if all(isinstance(w, int) and not isinstance(w, bool) for w in v.values()):
                return {"values": list(v), "weights": list(v.values())}
        return v

    @model_validator(mode="after")
    def _weights(self) -> "ChoiceRule":
        if self.weights is not None:
            if len(self.weights) != len(self.values):
                raise ValueError(f"choice has {len(self.values)} values and {len(self.weights)} weights; give one "
                                 "weight per value")
            if any(w < 1 for w in self.weights) or sum(self.weights) > 1_000_000:
                raise ValueError("choice weights must be whole numbers from 1, summing to at most 1000000")
        return self


class GeneralizeRule(Strict):
    """Coarser values for analytics: numbers down to a multiple of `step` (ages 37 -> 30),
    dates and timestamps truncated `to` a unit (2021-05-17 -> 2021-05-01), text cut to its
    first `prefix` characters (zip 90210 -> 902, with `fill: '*'` -> 902**)."""

    step: float | None = Field(default=None, gt=0)
    to: Literal["day", "week", "month", "quarter", "year", "decade"] | None = None
    prefix: int | None = Field(default=None, ge=0, le=1000)
    fill: str | None = Field(default=None, min_length=1, max_length=1, description="with prefix: pad to the length")

    @model_validator(mode="after")
    def _one(self) -> "GeneralizeRule":
        given = [k for k in ("step", "to", "prefix") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("generalize needs exactly one of step (numbers), to (dates: month, year, ...) or "
                             "prefix (text)")
        if self.fill is not None and self.prefix is None:
            raise ValueError("fill applies to generalize: {prefix: n} only")
        return self


class RuleCase(Strict):
    when: str = Field(min_length=1, description="SQL condition on the row, evaluated by PostgreSQL")
    rule: "ColumnRule"


class ColumnRule(Strict):
    """How one column is masked: a mapping with exactly one kind (faker, template, constant,
    null, hash, partial, shift_days, keep, noise, regex, choice, generalize, json, cases), or
    a shorthand: a Faker provider name (`name`), `keep`, `hash`, or null (YAML's `~`/`null`)
    for the null rule. `json` maps paths in a json/jsonb document to rules; `cases` is an
    ordered list of {when: SQL condition, rule} with an `else` rule for the other rows."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    faker: str | None = Field(default=None, description="Faker provider called without arguments, e.g. email")
    locale: str | None = Field(default=None, description="Faker locale; default anonymize.locale")
    template: str | None = Field(default=None, description="e.g. user_{id}@example.com; {hash} is the value's keyed hash")
    constant: str | int | float | bool | None = None
    null: bool = False
    hash: HashRule | None = None
    partial: PartialRule | None = None
    shift_days: int | None = Field(default=None, ge=1, le=36500, description="move dates by up to this many days")
    keep: bool = False
    noise: NoiseRule | None = None
    regex: RegexRule | None = None
    choice: ChoiceRule | None = None
    generalize: GeneralizeRule | None = None
    json_paths: dict[str, "ColumnRule"] | None = Field(
        default=None, alias="json", description="json/jsonb column: path (contact.email, phones[*]) -> rule")
    cases: list[RuleCase] | None = Field(default=None, min_length=1, description="ordered {when, rule}; first match")
    fallback: "ColumnRule | None" = Field(default=None, alias="else", description="with cases: the other rows' rule")
    unique: bool = Field(default=False, description="append a keyed suffix so distinct inputs stay distinct")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if v is None:
            return {"null": True}
        if isinstance(v, str):
            word = v.strip()
            if word in ("keep", "null"):
                return {word: True}
            return {"hash": {}} if word == "hash" else {"faker": word}
        if isinstance(v, dict):
            v = {("null" if k is None else k): val for k, val in v.items()}  # YAML reads `null:` as None
            if "constant" in v and v["constant"] is None:
                raise ValueError("constant: null is the null rule; write `column: null`")
            if "else" in v and v["else"] is None:
                v["else"] = {"null": True}
            if v.get("hash") is True:
                v["hash"] = {}
            elif v.get("hash") is False:
                v.pop("hash")
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> "ColumnRule":
        given = [k for k in _RULE_KINDS if (getattr(self, k) is True if k in ("null", "keep") else k in self.model_fields_set
                                            and getattr(self, k) is not None)]
        if len(given) != 1:
            got = f" (got {', '.join(_KIND_NAMES.get(k, k) for k in given)})" if given else ""
            raise ValueError(f"give exactly one of {', '.join(_KIND_NAMES.get(k, k) for k in _RULE_KINDS)}{got}")
        if given[0] == "cases" and self.fallback is None:
            raise ValueError("cases needs an else: rule for the rows no condition matches (else: keep to copy them)")
        if self.fallback is not None and given[0] != "cases":
            raise ValueError("else applies to cases only")
        if given[0] == "json_paths":
            if not self.json_paths:
                raise ValueError("json needs at least one path, e.g. json: {contact.email: email}")
            for path, sub in self.json_paths.items():
                if sub.kind in ("json", "cases"):
                    raise ValueError(f"json path {path!r}: a path's rule cannot be json or cases; name the "
                                     "deeper path instead")
        if given[0] == "cases":
            for sub in [c.rule for c in self.cases] + [self.fallback]:
                if sub.kind in ("json", "cases") or sub.unique:
                    raise ValueError("a rule under cases cannot be json, cases or unique")
        if self.unique and given[0] not in ("faker", "hash", "template"):
            raise ValueError("unique applies to faker, hash and template rules")
        if self.locale and given[0] != "faker":
            raise ValueError("locale applies to faker rules only")
        if self.template is not None:
            import string

            for _, name, spec, conv in string.Formatter().parse(self.template):
                if name is not None and (not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or spec or conv):
                    raise ValueError(f"template placeholder {{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}} "
                                     "must be a plain column name such as {id}")
        return self

    @property
    def kind(self) -> str:
        k = next(k for k in _RULE_KINDS if (getattr(self, k) is True if k in ("null", "keep") else
                                            k in self.model_fields_set and getattr(self, k) is not None))
        return _KIND_NAMES.get(k, k)


RuleCase.model_rebuild()


class AnonymizeSettings(Strict):
    salt: SecretStr | None = Field(default=None, description="secret key of the deterministic masking; from the environment")
    locale: str = Field(default="en_US", description="default Faker locale")
    default: Literal["fail", "null", "hash"] = Field(
        default="fail", description="personal-looking columns without a rule: refuse, null them, or hash them")
    pool_size: int = Field(default=5000, ge=100, le=1_000_000, description="values pre-generated per Faker provider")
    rules: dict[str, dict[str, ColumnRule]] = Field(default_factory=dict, description="table -> column -> rule")
    delete: dict[str, str] = Field(default_factory=dict, description="table -> SQL condition of rows to drop")

    @field_validator("rules", mode="before")
    @classmethod
    def _tables(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: ({} if body is None else body) for k, body in v.items()}
        return v

    @field_validator("salt")
    @classmethod
    def _salt(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            if len(v.get_secret_value()) < 16:
                raise ValueError("must be at least 16 characters; generate one with `openssl rand -hex 32`")
            register_secret(v.get_secret_value())
        return v


class RefreshSettings(Strict):
    exclude: list[str] = Field(default_factory=list, description="tables not copied at all (not even created)")
    truncate: list[str] = Field(default_factory=list, description="tables created empty")
    subset: dict[str, str] = Field(default_factory=dict, description="table -> SQL condition of rows to copy; "
                                   "rows of other tables follow the rows they point to, and rows pointed to come along")
    copy_whole: list[str] = Field(default_factory=list, description="tables whose rows do not follow a subset: all "
                                  "copied (and what they point to with them)")
    backup_target_first: bool = Field(default=False, description="back up the target before replacing it")
    allow_production_to_development: bool = Field(default=False, description="let production data reach a development target")
    jobs: int = Field(default=0, ge=0, le=32, description="tables copied at once; 0: one per core")

    @model_validator(mode="after")
    def _disjoint(self) -> "RefreshSettings":
        both = sorted(set(self.exclude) & set(self.truncate))
        if both:
            raise ValueError(f"table {both[0]} is in both exclude and truncate; keep it in one")
        filtered = sorted(set(self.subset) & (set(self.exclude) | set(self.truncate)))
        if filtered:
            raise ValueError(f"table {filtered[0]} has a subset filter but is excluded or truncated")
        whole = sorted(set(self.copy_whole) & (set(self.subset) | set(self.exclude) | set(self.truncate)))
        if whole:
            raise ValueError(f"table {whole[0]} is in copy_whole and also has a subset filter or is excluded or "
                             "truncated; keep it in one")
        return self


class TransformSettings(Strict):
    path: Path = Field(default=Path("transforms"),
                       description="folder of transform modules; relative to the config file unless absolute")
    batch_size: int = Field(default=5000, ge=1, le=1_000_000, description="rows in the first batch; later ones adapt")
    max_batch_seconds: float = Field(default=1.0, gt=0, le=600, description="every batch's transaction stays under this")
    throttle_ms: int = Field(default=0, ge=0, le=600_000, description="pause between batches, to limit the load")
    workers: int = Field(default=1, ge=1, le=64, description="disjoint key ranges processed at once")


class Settings(Strict):
    environments: dict[str, Environment]
    storage: StorageSettings
    backups: BackupSettings = BackupSettings()
    postgres: PostgresSettings = PostgresSettings()
    prefect: PrefectSettings = PrefectSettings()
    migrations: MigrationSettings = MigrationSettings()
    alerts: AlertSettings = AlertSettings()
    schedules: ScheduleSettings = ScheduleSettings()
    anonymize: AnonymizeSettings = AnonymizeSettings()
    refresh: RefreshSettings = RefreshSettings()
    validation: ValidationSettings = ValidationSettings()
    transforms: TransformSettings = TransformSettings()
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

    def path_of(self, configured: Path) -> Path:
        """A folder named in the config: relative to the config file's folder unless absolute."""
        path = Path(configured).expanduser()
        if not path.is_absolute():
            base = Path(self.source).resolve().parent if self.source else Path.cwd()
            path = base / path
        return path

    @property
    def migrations_dir(self) -> Path:
        return self.path_of(self.migrations.path)

    @property
    def transforms_dir(self) -> Path:
        return self.path_of(self.transforms.path)

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
    for model in (Settings, Environment, StorageSettings, BackupSettings, PostgresSettings, PrefectSettings,
                  ScheduleSettings,
                  MigrationSettings, AlertSettings, AnonymizeSettings, RefreshSettings, ColumnRule, HashRule,
                  PartialRule, NoiseRule, RegexRule, ChoiceRule, GeneralizeRule, RuleCase, ValidationSettings, RowCountBounds, CustomCheck, ExpectValue, TransformSettings):
        keys.update(model.model_fields)
        keys.update(f.alias for f in model.model_fields.values() if f.alias)
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
