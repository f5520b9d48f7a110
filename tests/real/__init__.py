"""Public PostgreSQL sample databases, committed compressed, for `make test-real`.

Each folder holds the files of one sample database as its authors publish them (xz-compressed, not
edited; SOURCE.md says where from, which commit and under which license). `load_real(name, dsn)`
feeds them to psql, the way their READMEs say to load them, into an existing empty database, and
makes what a dump written for another server says about that server harmless:

- `\\connect`/`\\c`, `CREATE DATABASE` and `DROP DATABASE` lines are left out: the database is the
  one `dsn` names (chinook creates and connects to its own);
- `\\i FILE` reads FILE from the same folder (employees loads its data that way);
- `ALTER ... OWNER TO role` for a role the server does not have is left out, so the objects belong
  to the user that loads them (pagila names `postgres`, which exists on pgserver and on Debian).

Nothing is downloaded: the tests run offline.
"""

from __future__ import annotations

import lzma
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import sql

from dataops.dsn import Dsn
from dataops.tasks import pg

HERE = Path(__file__).resolve().parent

# name -> the files psql reads, in order (`\i` inside them pulls in the others)
DATABASES: dict[str, list[str]] = {
    "pagila": ["pagila-schema.sql.xz", "pagila-data.sql.xz"],
    "northwind": ["northwind.sql.xz"],
    "chinook": ["Chinook_PostgreSql.sql.xz"],
    "employees": ["employee.sql.xz"],
}

_SKIP = re.compile(r"^\s*(\\c(onnect)?\b|(CREATE|DROP)\s+DATABASE\b)", re.IGNORECASE)
_INCLUDE = re.compile(r"^\s*\\i(r)?\s+'?([^'\s]+)'?\s*$")
_OWNER = re.compile(r"^\s*ALTER\s+.*\sOWNER\s+TO\s+\"?([^\s\";]+)\"?\s*;\s*$", re.IGNORECASE)


def _lines(folder: Path, filename: str, roles: set[str]) -> Iterator[str]:
    with lzma.open(folder / filename, "rt", encoding="utf-8", newline="") as f:
        in_copy = False
        for line in f:
            if in_copy:  # COPY ... FROM stdin data is passed through untouched up to its terminator
                in_copy = line.rstrip("\r\n") != "\\."
                yield line
                continue
            if _SKIP.match(line):
                continue
            m = _INCLUDE.match(line)
            if m:
                name = m.group(2)
                yield from _lines(folder, name if name.endswith(".xz") else name + ".xz", roles)
                continue
            m = _OWNER.match(line)
            if m and m.group(1) not in roles:
                continue
            if re.match(r"^\s*COPY\s.*\sFROM\s+stdin", line, re.IGNORECASE):
                in_copy = True
            yield line


def load_real(name: str, dsn: Dsn, *, scale: int = 1) -> None:
    """Load sample database `name` into the empty database `dsn` with psql (ON_ERROR_STOP).

    `scale` > 1 (employees only) adds scale-1 copies of every employee with its departments,
    titles and salaries, under emp_no + k * 1,000,000: the same shapes, more rows (the emp_no
    sequence is left where the dump leaves it, as it is without scaling)."""
    if name not in DATABASES:
        raise ValueError(f"unknown sample database {name!r}; known: {', '.join(DATABASES)}")
    major, _ = pg.server_version(dsn)
    psql = pg.client_binary("psql", major)
    with pg.connect(dsn, autocommit=True) as conn:
        roles = {r for (r,) in conn.execute("SELECT rolname FROM pg_roles")}
    folder = HERE / name
    with tempfile.TemporaryFile("w+", encoding="utf-8") as err:  # NOTICEs too: a pipe could fill up
        conninfo, env = dsn.libpq_args()
        proc = subprocess.Popen([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", conninfo], env={**os.environ, **env},
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err, encoding="utf-8")
        try:
            for filename in DATABASES[name]:
                for line in _lines(folder, filename, roles):
                    proc.stdin.write(line)
            proc.stdin.close()
        except BrokenPipeError:
            pass  # psql stopped at an error: reported below
        if proc.wait() != 0:
            err.seek(0)
            raise RuntimeError(f"loading {name} failed: {err.read().strip()[-2000:]}")
    if scale > 1:
        if name != "employees":
            raise ValueError("only employees can be scaled up")
        _scale_employees(dsn, scale)
    with pg.connect(dsn, autocommit=True) as conn:
        conn.execute("ANALYZE")


def _scale_employees(dsn: Dsn, scale: int) -> None:
    with pg.connect(dsn) as conn:
        for k in range(1, scale):
            off = k * 1_000_000
            conn.execute("INSERT INTO employee SELECT emp_no + %s, birth_date, first_name, last_name, gender, hire_date "
                         "FROM employee WHERE emp_no < 1000000", (off,))
            for table in ("dept_emp", "dept_manager", "title", "salary"):
                conn.execute(sql.SQL("INSERT INTO {t} SELECT emp_no + %s, {rest} FROM {t} WHERE emp_no < 1000000").format(
                    t=sql.Identifier(table), rest=sql.SQL(_REST[table])), (off,))
        conn.commit()


_REST = {"dept_emp": "dept_no, from_date, to_date", "dept_manager": "dept_no, from_date, to_date",
         "title": "title, from_date, to_date", "salary": "amount, from_date, to_date"}


def table_rows(dsn: Dsn) -> dict[str, int]:
    """Exact row counts of every ordinary and partitioned table outside the tool's own schemas."""
    with psycopg.connect(dsn.conninfo(), autocommit=True) as conn:
        tables = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND n.nspname NOT IN ('pg_catalog', "
            "'information_schema') AND n.nspname NOT LIKE 'pg\\_%%' AND n.nspname NOT LIKE 'dataops\\_%%' "
            "ORDER BY 1, 2").fetchall()
        return {f"{s}.{t}": conn.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(
            sql.Identifier(s), sql.Identifier(t))).fetchone()[0] for s, t in tables}
