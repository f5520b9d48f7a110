"""Preflight of a migration: everything that must hold before anything is changed.

Status (where the database is, what is pending), the plan (the SQL, rendered offline), lint,
the database's own checks with its schema fingerprint and table checksums (what a rollback
must get back to), and whether another migration holds the lock right now. Every problem is
collected rather than the first one raised, so a person fixes them in one go.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefect import task
from prefect.cache_policies import NO_CACHE

from dataops.settings import Settings
from dataops.tasks.migration import migrate
from dataops.tasks.migration.checks import DatabaseState, inspect_database
from dataops.tasks.migration.lint import Finding, lint, usage_lookup


@dataclass
class Preflight:
    environment: str
    current: str | None
    target: str | None
    plans: list[migrate.RevisionPlan]
    findings: list[Finding]
    state: DatabaseState
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def pending(self) -> list[str]:
        return [p.revision for p in self.plans]


def preflight(settings: Settings, env_name: str, to: str = "head") -> Preflight:
    from dataops.tasks import pg

    mt = migrate.target_for(settings, env_name)
    status = migrate.status(mt)
    target = migrate.resolve(mt.path, to)
    plans = migrate.plan(mt, to, current=status.current)
    with pg.connect(mt.dsn, autocommit=True, timeout=mt.connect_timeout) as conn:
        findings = lint(plans, dependents=usage_lookup(conn))
    state = inspect_database(settings.env(env_name), checks=settings.validation, timeout=mt.connect_timeout)
    problems = []
    blocking = [f for f in findings if f.blocks]
    if blocking:
        revs = sorted({f.revision for f in blocking})
        problems.append(f"lint: {len(blocking)} error(s) in revision(s) {', '.join(revs)} "
                        f"(first: {blocking[0].rule}: {blocking[0].statement}); fix them or allow a checked one with "
                        "`# dataops: allow=<rule>` in the revision file")
    problems += [f"check: {p}" for p in state.problems]
    if plans:
        holder = migrate.lock_is_free(mt)
        if holder:
            problems.append(holder)
    return Preflight(env_name, status.current, target, plans, findings, state, problems)


@task(name="preflight-migration", cache_policy=NO_CACHE)
def preflight_task(settings: Settings, env_name: str, to: str) -> Preflight:
    return preflight(settings, env_name, to)


@task(name="check-database", cache_policy=NO_CACHE)
def check_task(settings: Settings, env_name: str, checksums: bool = False) -> DatabaseState:
    return inspect_database(settings.env(env_name), checks=settings.validation, checksums=checksums,
                            timeout=settings.postgres.connect_timeout)
