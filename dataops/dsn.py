"""A database URL that never shows its password.

`str()` and `repr()` give the masked form, so a DSN can be logged, put in an error or an
artifact without thought. Only `secret()` and `conninfo()` give the real thing, and only
code that opens a connection or starts pg_dump calls them.

Both also switch row-level security off for the session (`-c row_security=off`, what pg_dump
does): a role that a policy would hide rows from then gets an error instead of a silently
short table, so a backup, checksum, validation or copy never reports on part of a table as if
it were the whole of it.
"""

from __future__ import annotations

import re
from typing import Any

import psycopg.conninfo
from pydantic_core import core_schema

from dataops.redact import redact_url, register_secret

ROW_SECURITY_OFF = "-c row_security=off"


def with_row_security_off(options: str | None) -> str:
    """libpq `options` with row_security=off last (a later -c wins), keeping the user's own."""
    options = (options or "").strip()
    if re.search(r"(^|\s)(-c\s*|--)row_security=off\s*$", options):
        return options
    return f"{options} {ROW_SECURITY_OFF}".strip()


class Dsn:
    __slots__ = ("_raw", "_params")

    def __init__(self, raw: str):
        raw = raw.strip()
        if not raw:
            raise ValueError("is empty; set it to a URL like postgresql://user@host:5432/dbname")
        if "://" in raw and not raw.startswith(("postgresql://", "postgres://")):
            scheme = raw.split("://", 1)[0]
            raise ValueError(f"has scheme '{scheme}://'; use postgresql://user@host:5432/dbname")
        try:
            params = psycopg.conninfo.conninfo_to_dict(raw)
        except psycopg.ProgrammingError as exc:
            raise ValueError(f"is not a valid PostgreSQL URL ({redact_url(str(exc))})") from None
        if not params.get("dbname"):
            raise ValueError("names no database; add it to the path, e.g. postgresql://user@host:5432/dbname")
        register_secret(params.get("password"))
        self._raw = raw
        self._params = {k: str(v) for k, v in params.items() if v is not None}

    # -- the secret parts, for connecting only -------------------------------------------
    def secret(self) -> str:
        return self._raw

    def conninfo(self, **overrides: Any) -> str:
        """keyword=value conninfo, with overrides (dbname=..., connect_timeout=...), and
        row_security=off added to `options` (the URL's or the override's)."""
        options = overrides.pop("options", None)
        options = with_row_security_off(options if options is not None else self._params.get("options"))
        return psycopg.conninfo.make_conninfo(self._raw, **overrides, options=options)

    def libpq_args(self) -> tuple[str, dict[str, str]]:
        """A conninfo without the password, and the environment that carries it.

        pg_dump and pg_restore get the password through PGPASSWORD so that it never
        appears on a command line (visible to every user through `ps`). row_security=off is
        in the conninfo's `options`, for pg_restore and psql as for our own connections.
        """
        params = dict(self._params)
        params["options"] = with_row_security_off(params.get("options"))
        password = params.pop("password", None)
        env = {"PGPASSWORD": password} if password else {}
        return psycopg.conninfo.make_conninfo("", **params), env

    # -- safe to show -----------------------------------------------------------------
    @property
    def database(self) -> str:
        return self._params["dbname"]

    @property
    def host(self) -> str:
        return self._params.get("host", "localhost")

    @property
    def port(self) -> str:
        return self._params.get("port", "5432")

    @property
    def user(self) -> str | None:
        return self._params.get("user")

    def with_database(self, dbname: str) -> "Dsn":
        return Dsn(psycopg.conninfo.make_conninfo(self._raw, dbname=dbname))

    def same_server(self, other: "Dsn") -> bool:
        return (self.host, self.port) == (other.host, other.port)

    def __str__(self) -> str:
        if "://" in self._raw:
            return redact_url(self._raw)
        shown = {k: ("***" if k == "password" else v) for k, v in self._params.items()}
        return " ".join(f"{k}={v}" for k, v in shown.items())

    def __repr__(self) -> str:
        return f"Dsn({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dsn) and other._params == self._params

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._params.items())))

    @classmethod
    def __get_pydantic_core_schema__(cls, _source: Any, _handler: Any) -> core_schema.CoreSchema:
        def validate(value: Any) -> "Dsn":
            if isinstance(value, Dsn):
                return value
            if not isinstance(value, str):
                raise ValueError("must be a string like postgresql://user@host:5432/dbname")
            return cls(value)

        return core_schema.no_info_plain_validator_function(
            validate, serialization=core_schema.plain_serializer_function_ser_schema(str)
        )
