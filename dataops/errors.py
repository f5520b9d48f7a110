"""One small error family, caught at the edge (CLI, flow) and printed as one line.

The kind decides two things a caller needs: the exit code (bad input is 2, a failed
operation is 1) and whether a retry can help (only transient faults are retried).
"""

from __future__ import annotations

import re
from enum import Enum


class Kind(str, Enum):
    BAD_INPUT = "bad_input"  # the user must change config, parameters or the command line
    FAILED = "failed"  # the operation ran and failed; retrying will not help
    TRANSIENT = "transient"  # network, S3 5xx, lock timeout: a retry may succeed


class DataopsError(Exception):
    kind: Kind = Kind.FAILED

    def __init__(self, message: str, *, kind: Kind | None = None):
        from dataops.redact import redact

        super().__init__(redact(message))
        if kind is not None:
            self.kind = kind

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    @property
    def exit_code(self) -> int:
        return 2 if self.kind is Kind.BAD_INPUT else 1

    def __reduce__(self):  # keep the kind when Prefect pickles the exception
        return (_rebuild, (type(self), self.message, self.kind))


def _rebuild(cls, message, kind):
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.kind = kind
    return err


class ConfigError(DataopsError):
    kind = Kind.BAD_INPUT


class BadInput(DataopsError):
    kind = Kind.BAD_INPUT


class OperationFailed(DataopsError):
    kind = Kind.FAILED


class TransientError(DataopsError):
    kind = Kind.TRANSIENT


class SafetyRefusal(DataopsError):
    """A guard refused to act (production target without confirmation, and so on)."""

    kind = Kind.BAD_INPUT


def first_line(exc: BaseException) -> str:
    """What an error says in one line, secrets masked: for reports that list many failures."""
    from dataops.redact import redact

    text = redact(str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# What PostgreSQL says when row_security = off (every connection of ours, and pg_dump's) meets a
# table whose policies would filter the rows of the current role.
_ROW_SECURITY = re.compile(r'query would be affected by row-level security policy for table "((?:[^"]|"")+)"')
ROW_SECURITY_FIX = "grant the role BYPASSRLS, or connect as the table's owner"


def row_security_table(error: BaseException | str) -> str | None:
    """The table a row-level-security refusal names (unqualified, as PostgreSQL says it), or None."""
    m = _ROW_SECURITY.search(str(error))
    return m.group(1).replace('""', '"') if m else None


def row_security_error(error: BaseException | str, *, role: str | None = None,
                       table: str | None = None) -> BadInput | None:
    """The one-line BadInput for a row-level-security refusal (an exception, or the stderr of
    pg_dump, pg_restore or psql), or None when `error` is something else.

    Reading through a policy would see only some rows, and a backup, checksum or copy of some
    rows is worse than none: dataops switches row security off and lets PostgreSQL refuse."""
    named = row_security_table(error)
    if named is None:
        return None
    shown = table or f'"{named}"'  # `table`: the caller's qualified name for it, when it found one
    who = f"role {role}" if role else "the role dataops connects as"
    return BadInput(f"row-level security on table {shown} would hide rows from {who}; {ROW_SECURITY_FIX}")


def classify(exc: BaseException) -> BaseException:
    """`exc` as the DataopsError an operator can act on, when we know one (a row-level-security
    refusal is bad input: exit 2); otherwise `exc` itself. For the edges (CLI, flows) that catch
    what a task raised."""
    if isinstance(exc, DataopsError):
        return exc
    return row_security_error(exc) or exc


def is_transient(exc: BaseException) -> bool:
    """Whether a retry can help. Unknown exceptions are not retried: failing fast is safer."""
    if isinstance(exc, DataopsError):
        return exc.kind is Kind.TRANSIENT
    try:
        import psycopg

        if isinstance(exc, psycopg.OperationalError):
            return True
        if isinstance(exc, (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected,
                            psycopg.errors.LockNotAvailable)):
            return True
    except ImportError:  # pragma: no cover
        pass
    try:
        from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        if isinstance(exc, (BotoConnectionError, EndpointConnectionError, ReadTimeoutError)):
            return True
        if isinstance(exc, ClientError):
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return status >= 500 or exc.response.get("Error", {}).get("Code") in {"SlowDown", "RequestTimeout"}
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, (ConnectionError, TimeoutError))


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry only faults a retry can fix."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - we classify whatever the task raised
        return is_transient(exc)
    return False
