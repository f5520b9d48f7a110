"""refresh-staging: production copied into staging with every personal field masked, checked,
and switched in by rename; `check=True` only runs the guards and the rule check."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

import dataops.flows.engine  # noqa: F401  (runs end without a second's wait: see there)
from dataops.errors import retry_if_transient
from dataops.flows.backup_database import backup_database
from dataops.settings import Environment, Settings, load_settings
from dataops.tasks.anonymize.leak_scan import LeakReport, Matches, Workspace
from dataops.tasks.refresh.plan import RefreshPlan, resolve_environments
from dataops.tasks.refresh.steps import (
    ColumnIds,
    NewCopy,
    PlainSteps,
    RefreshReport,
    SourceSnapshot,
    check_refresh,
    cleanup_leftovers,
    copy_data,
    create_copy,
    finish_copy,
    match_leaks,
    plan_and_guard,
    refresh,
    source_checksums,
    switch,
    target_checksums,
    validate_copy,
)
from dataops.tasks.refresh.table_copy import CopyResult
from dataops.tasks.reporting import markdown_table, publish_markdown


@flow(name="refresh-staging")
def refresh_staging(source: str | None = None, target: str | None = None, check: bool = False,
                    config: str | None = None) -> dict:
    settings = load_settings(config)
    src, tgt = resolve_environments(settings, source, target)  # refuse before connecting anywhere
    logger = get_run_logger()
    if check:
        report = check_task(settings, src.name, tgt.name)
    else:
        report = refresh(settings, src.name, tgt.name, steps=PrefectSteps, progress=logger.info)
    publish_markdown(f"refresh-{tgt.name}", render(report), report.summary())
    return as_dict(report)


# -- the refresh's steps as Prefect tasks: refresh() runs them in its order -------------------------
# They take live objects (the open source snapshot, the leak-scan workspace): the flow runs
# them in its own process, and every reader must share the snapshot the flow holds open.

TRANSIENT = dict(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=retry_if_transient)


@task(name="check-refresh", **TRANSIENT)
def check_task(settings: Settings, source: str | None, target: str | None) -> RefreshReport:
    return check_refresh(settings, source, target)


@task(name="plan-refresh", cache_policy=NO_CACHE)
def plan_task(settings: Settings, snap: SourceSnapshot, source: Environment, target: Environment) -> RefreshPlan:
    return plan_and_guard(settings, snap, source, target)


@task(name="drop-leftover-copies", **TRANSIENT)
def cleanup_task(target: Environment) -> list[str]:
    return cleanup_leftovers(target)


@task(name="create-copy", cache_policy=NO_CACHE)
def create_copy_task(settings: Settings, plan: RefreshPlan, snap: SourceSnapshot, target: Environment) -> NewCopy:
    return create_copy(settings, plan, snap, target)


@task(name="source-checksums", cache_policy=NO_CACHE)
def source_checksums_task(settings: Settings, plan: RefreshPlan, snap: SourceSnapshot) -> dict:
    return source_checksums(settings, plan, snap)


@task(name="copy-tables", cache_policy=NO_CACHE)
def copy_data_task(plan: RefreshPlan, snap: SourceSnapshot, new: NewCopy, workspace: Workspace,
                   column_ids: ColumnIds, settings: Settings) -> list[CopyResult]:
    return copy_data(plan, snap, new, workspace, column_ids, settings)


@task(name="indexes-and-constraints", cache_policy=NO_CACHE)
def finish_copy_task(settings: Settings, plan: RefreshPlan, new: NewCopy) -> None:
    finish_copy(settings, plan, new)


@task(name="validate-copy", cache_policy=NO_CACHE)
def validate_copy_task(plan: RefreshPlan, new: NewCopy, results: list[CopyResult], expected: dict, actual: dict,
                       matches: Matches, column_ids: ColumnIds) -> tuple[list[str], list[str], LeakReport]:
    return validate_copy(plan, new, results, expected, actual, matches, column_ids)


@task(name="match-leak-digests", cache_policy=NO_CACHE)
def match_leaks_task(plan: RefreshPlan, workspace: Workspace, column_ids: ColumnIds) -> Matches:
    return match_leaks(plan, workspace, column_ids)


@task(name="target-checksums", cache_policy=NO_CACHE)
def target_checksums_task(plan: RefreshPlan, new: NewCopy) -> dict:
    return target_checksums(plan, new)


@task(name="switch-to-copy", **TRANSIENT)
def switch_task(new: NewCopy, target: Environment) -> None:
    switch(new, target)


class PrefectSteps(PlainSteps):
    """The same steps as Prefect task runs, for the refresh-staging flow."""

    plan = plan_task
    cleanup = cleanup_task
    create_copy = create_copy_task
    copy_data = copy_data_task
    finish_copy = finish_copy_task
    validate = validate_copy_task
    switch = switch_task

    @staticmethod
    def backup(settings: Settings, target: Environment) -> str:
        return backup_database(target.name, config=settings.source)["id"]

    @staticmethod
    def source_checksums(pool: ThreadPoolExecutor, settings: Settings, plan: RefreshPlan, snap: SourceSnapshot):
        return source_checksums_task.submit(settings, plan, snap)

    @staticmethod
    def target_checksums(pool: ThreadPoolExecutor, plan: RefreshPlan, new: NewCopy):
        return target_checksums_task.submit(plan, new)

    @staticmethod
    def match_leaks(pool: ThreadPoolExecutor, plan: RefreshPlan, workspace: Workspace, column_ids: ColumnIds):
        return match_leaks_task.submit(plan, workspace, column_ids)


def as_dict(report: RefreshReport) -> dict:
    leaks = report.leaks
    return {
        "source": report.source, "target": report.target, "check_only": report.check_only,
        "tables": {t.table: t.rows for t in report.tables}, "rows": report.rows,
        "masked": [f"{t}.{c}: {rule}" for t, c, rule in report.masked],
        "unmasked_personal": report.unmasked_personal, "defaulted": report.defaulted,
        "leak_scan": None if leaks is None else {"leaked": leaks.leaked, "checked": leaks.checked,
                                                  "source_values": leaks.source_values, "summary": leaks.summary()},
        "checks": report.checks, "phases": {k: round(v, 2) for k, v in report.phases.items()},
        "cleaned": report.cleaned, "backup_id": report.backup_id, "seconds": round(report.seconds, 2),
        "summary": report.summary(),
    }


def render(report: RefreshReport) -> str:
    title = "Refresh check" if report.check_only else "Refresh"
    lines = [f"# {title}: {report.source} -> {report.target}", "", f"**{report.summary()}**", ""]
    if report.leaks is not None:
        lines += [f"- {report.leaks.summary()}"]
    lines += [f"- {c}" for c in report.checks]
    if report.backup_id:
        lines.append(f"- backup of {report.target} taken first: `{report.backup_id}`")
    if report.cleaned:
        lines.append(f"- dropped copies left by interrupted runs: {', '.join(report.cleaned)}")
    if report.phases:
        lines.append("- time: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.phases.items()))
    if report.unmasked_personal:
        lines += ["", "## Personal-looking columns without a rule (refresh refused)", ""]
        lines += [f"- {f}" for f in report.unmasked_personal]
    if report.defaulted:
        lines += ["", "## Masked by anonymize.default", ""] + [f"- {f}" for f in report.defaulted]
    lines += ["", "## Tables", "", markdown_table([t.as_row() for t in report.tables])]
    if report.leaks is not None:
        lines += ["", "## Leak scan", "", markdown_table([c.as_row() for c in report.leaks.columns])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    print(refresh_staging(check="--check" in sys.argv)["summary"])
