"""Undoing a transform: its own REVERT (SQL, batched like the change), else its snapshot.

The snapshot is the foundation's table snapshot (tasks/snapshot.py) of the rows the
transform's WHERE selected, taken before the first batch. dataops.tasks.transform.snapshot.restore_snapshot
puts it back in one statement with the table's triggers disabled, which holds a lock that
blocks every writer until it commits; on a large table that is the long lock transforms
exist to avoid. So the restore here is the same idea in key-range batches: each batch
disables user triggers (a trigger such as users_set_updated_at would otherwise stamp a new
updated_at over the one being restored), writes back the snapshot's values where they
differ, re-inserts the rows the transform deleted (their keys are recorded as they go, so a
row the application deleted since stays deleted), enables the triggers and commits, all
within the max_batch_seconds bound.

Limits, as for restore_snapshot: rows inserted after the snapshot are left alone, and an
application write made to a snapshotted row after the transform is overwritten.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime

import psycopg
from psycopg import sql

from dataops.tasks import pg
from dataops.tasks.transform import keys
from dataops.tasks.transform.batches import Deadline, Key, KeysetBound, SqlBatcher
from dataops.tasks.transform.keys import key_range
from dataops.tasks.transform.snapshot import SCHEMA as SNAPSHOT_SCHEMA
from dataops.tasks.transform.snapshot import Snapshot
from dataops.tasks.transform.spec import Target, TransformSpec
from dataops.tasks.transform.state import BatchCounts


def snapshot_to_json(snap: Snapshot) -> dict:
    return {**dataclasses.asdict(snap), "taken_at": snap.taken_at.isoformat()}


def snapshot_from_json(data: dict) -> Snapshot:
    return Snapshot(**{**data, "columns": tuple(data["columns"]), "key": tuple(data["key"]),
                       "taken_at": datetime.fromisoformat(data["taken_at"])})


def index_snapshot(conn: psycopg.Connection, snap: Snapshot) -> None:
    """Keyset batches over the snapshot need its key indexed (CREATE TABLE AS copies no index)."""
    conn.execute(sql.SQL("CREATE UNIQUE INDEX ON {} ({})").format(
        pg.qualified(SNAPSHOT_SCHEMA, snap.name), sql.SQL(", ").join(map(sql.Identifier, snap.key))))


def own_revert_spec(spec: TransformSpec) -> TransformSpec:
    """The transform's REVERT as a transform of its own: same table and key, no row check."""
    return dataclasses.replace(spec, where=spec.revert_where, set=spec.revert, delete=None, valid_sql=None,
                               valid_fn=None, change=None, kind="sql")


class SnapshotBatcher(KeysetBound):
    """Batches over the snapshot's keys; each writes the snapshot's values back."""

    def __init__(self, snap: Snapshot, target: Target, victim: int):
        self.snap, self.target, self.victim = snap, target, victim
        # the snapshot's rows are keyed by the same column as the table
        self.keys_table = pg.qualified(SNAPSHOT_SCHEMA, snap.name)
        self.all_columns = set(target.columns) <= set(snap.columns)
        self._stmt: dict[bool, sql.Composed] = {}

    def statement(self, with_lo: bool) -> sql.Composed:
        if with_lo not in self._stmt:
            t, snap = self.target, self.snap
            cols = [c for c in snap.columns if c not in t.key]
            src = self.keys_table
            rng_s = key_range(t, "lo" if with_lo else None, "hi", alias="s")
            rng_t = key_range(t, "lo" if with_lo else None, "hi", alias="x")
            parts = [sql.SQL("upd AS (UPDATE {t} AS x SET {sets} FROM {src} AS s WHERE {join} AND {rs} AND {rt} "
                             "AND ROW({xc}) IS DISTINCT FROM ROW({sc}) RETURNING 1)").format(
                t=t.qualified, sets=sql.SQL(", ").join(sql.SQL("{c} = s.{c}").format(c=sql.Identifier(c)) for c in cols),
                src=src, join=keys.same_key(t, "x", "s"), rs=rng_s, rt=rng_t,
                xc=sql.SQL(", ").join(sql.Identifier("x", c) for c in cols),
                sc=sql.SQL(", ").join(sql.Identifier("s", c) for c in cols))]
            inserted = sql.SQL("0")
            if self.all_columns:
                names = sql.SQL(", ").join(map(sql.Identifier, snap.columns))
                parts.append(sql.SQL(
                    "ins AS (INSERT INTO {t} ({names}) OVERRIDING SYSTEM VALUE SELECT {scols} FROM {src} AS s "
                    "WHERE {rs} AND NOT EXISTS (SELECT 1 FROM {t} AS x WHERE {join}) "
                    "AND EXISTS (SELECT 1 FROM dataops_transforms.deleted d WHERE d.run_id = %(victim)s "
                    "AND d.key IN ({enc})) RETURNING 1)").format(
                    t=t.qualified, names=names, src=src, rs=rng_s, join=keys.same_key(t, "x", "s"),
                    enc=sql.SQL(", ").join(keys.recorded(t, "s")),
                    scols=sql.SQL(", ").join(sql.Identifier("s", c) for c in snap.columns)))
                inserted = sql.SQL("(SELECT count(*) FROM ins)")
            self._stmt[with_lo] = sql.SQL("WITH {parts} SELECT (SELECT count(*) FROM upd), {ins}").format(
                parts=sql.SQL(", ").join(parts), ins=inserted)
        return self._stmt[with_lo]

    def apply(self, conn: psycopg.Connection, lo: Key | None, hi: Key, deadline: Deadline) -> BatchCounts:
        t = self.target
        switches = t.trigger_switches if t.update_triggers or self.all_columns else []
        # one order in every worker: they queue on these locks, never deadlock; each ALTER waits for writers in
        # flight: within the budget, or the batch is retried
        silenced = pg.silence_user_triggers(conn, switches, before_each=lambda: deadline.arm(conn))
        deadline.arm(conn)
        changed, inserted = conn.execute(self.statement(lo is not None),
                                         {"lo": lo, "hi": hi, "victim": self.victim}).fetchone()
        pg.restore_user_triggers(conn, silenced)
        return BatchCounts(matched=changed + inserted, changed=changed, inserted=inserted)


def batcher_for_revert(method: str, spec: TransformSpec, target: Target, snapshot: dict | None, victim: int):
    if method == "own":
        return SqlBatcher(own_revert_spec(spec), target)
    return SnapshotBatcher(snapshot_from_json(snapshot), target, victim)
