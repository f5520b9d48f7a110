"""Scratch databases: where a restore or a verification loads a backup before anything else sees it.

A scratch database is named `<base>__dataops_<purpose>_<hex>` and owned, for as long as a run uses
it, through a session advisory lock named for it on the server's maintenance database. A run that
dies (`kill -9`, a lost host) drops no `except` block, so its scratch database stays; the next run
on that server discards every scratch database whose lock it can take, which is exactly the ones no
live run owns. A scratch database being loaded right now is never taken.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
from collections.abc import Iterator

from dataops.dsn import Dsn
from dataops.errors import TransientError, first_line
from dataops.tasks import pg

log = logging.getLogger("dataops.scratch")
MARKER = "__dataops_"
PURPOSES = ("restore", "verify", "mtest")  # mtest: `dataops migrate ENV test`
_NAME = re.compile(rf"{MARKER}({'|'.join(PURPOSES)})_[0-9a-f]{{6}}$")


def scratch_name(base: str, purpose: str) -> str:
    if purpose not in PURPOSES:
        raise ValueError(f"scratch purpose {purpose!r} is not one of {PURPOSES}")
    return f"{base[:30]}{MARKER}{purpose}_{secrets.token_hex(3)}"


def _lock_key(name: str) -> str:
    return f"dataops-scratch:{name}"


@contextlib.contextmanager
def owned_scratch(server: Dsn, base: str, purpose: str) -> Iterator[str]:
    """Create a scratch database and own it until the block ends, then drop it (a restore that
    swapped it in has renamed it away by then, so nothing is dropped)."""
    name = scratch_name(base, purpose)
    with pg.connect(server, autocommit=True, dbname=pg.MAINTENANCE_DB,
                    application_name=f"dataops-{purpose}-owner") as owner:
        owner.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (_lock_key(name),))
        pg.create_database(server, name)
        try:
            yield name
        finally:
            try:
                pg.drop_database(server, name)
            except TransientError as exc:  # the server is away: keep the real error; the next run discards it
                log.warning("could not drop scratch database %s now (%s); the next run discards it",
                            name, first_line(exc))


def discard_leftovers(server: Dsn) -> list[str]:
    """Drop the scratch databases on `server` that no live run owns; returns their names."""
    discarded = []
    with pg.connect(server, autocommit=True, dbname=pg.MAINTENANCE_DB, application_name="dataops-scratch-collector") \
            as conn:
        names = [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE strpos(datname, %s) > 0 "
                                            "ORDER BY 1", (MARKER,))]
        for name in filter(_NAME.search, names):
            key = _lock_key(name)
            if not conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (key,)).fetchone()[0]:
                continue  # a live run is using it
            try:
                pg.drop_database(server, name)
                discarded.append(name)
                log.info("discarded %s, left by an interrupted run", name)
            finally:
                conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (key,))
    return discarded
