"""Preflight of a migration: everything that must hold before anything is changed.

Status (where the database is, what is pending), the plan (the SQL, rendered offline), lint,
the database's own checks with its schema fingerprint and table checksums (what a rollback
must get back to), and whether another migration holds the lock right now. Every problem is
collected rather than the first one raised, so a person fixes them in one go.

One failed check is not a problem here: an INVALID index that a pending `transactional = False`
revision builds concurrently. An interrupted run of that revision left it, and applying drops it
and builds it again (see migrate._drop_invalid_leftovers); refusing would leave the way forward
to a hand-typed DROP INDEX.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefect import task

from dataops.settings import Environment, Settings
from dataops.tasks.migration import migrate
from dataops.tasks.migration.checks import DatabaseState, inspect_database
from dataops.tasks.migration.lint import Finding, errors_sentence, lint_against
from dataops.tasks.retries import RETRY_TRANSIENT


@dataclass
class Preflight:
    environment: str
    current: str | None
    target: str | None
    plans: list[migrate.RevisionPlan]
    findings: list[Finding]
    state: DatabaseState
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what applying will fix by itself

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def pending(self) -> list[str]:
        return [p.revision for p in self.plans]


def preflight(settings: Settings, env: Environment, to: str = "head") -> Preflight:
    mt = migrate.target_for(settings, env)
    status = migrate.status(mt)
    target = migrate.resolve(mt.path, to)
    plans = migrate.plan(mt, to, current=status.current)
    findings = lint_against(mt, plans)
    state = inspect_database(env, checks=settings.validation, timeout=mt.connect_timeout)
    problems = []
    lint_errors = errors_sentence(findings)
    if lint_errors:
        problems.append(f"lint: {lint_errors}")
    rebuilt = {(ix if schema == "public" else f"{schema}.{ix}") for p in plans if not p.transactional
               for schema, ix in migrate.concurrent_indexes(p.sql)}
    notes = []
    for r in state.results:
        if r.failed and r.kind == "invalid_index" and r.constraint in rebuilt:
            notes.append(f"INVALID index {r.constraint} (left by an interrupted build) is dropped and built again "
                         "by a pending revision")
        elif r.failed:
            problems.append(f"check: {r.line()}")
    if plans:
        holder = migrate.lock_is_free(mt)
        if holder:
            problems.append(holder)
    return Preflight(env.name, status.current, target, plans, findings, state, problems, notes)


# -- Prefect tasks ---------------------------------------------------------------------------------

@task(name="preflight-migration", **RETRY_TRANSIENT)
def preflight_task(settings: Settings, env: Environment, to: str) -> Preflight:
    return preflight(settings, env, to)
