"""refresh-staging: production copied into staging with every personal field masked, checked,
and switched in by rename; `check=True` only runs the guards and the rule check."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from prefect import flow, get_run_logger, task

import dataops.flows.engine  # noqa: F401  (runs end without a second's wait: see there)
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
    copy_data,
    create_copy,
    discard_leftovers,
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
from dataops.tasks.retries import RETRY_TRANSIENT, RUN_ONCE


@flow(name="refresh-staging")
def refresh_staging(source: str | None = None, target: str | None = None, check: bool = False,
                    config: str | None = None) -> dict:
    settings = load_settings(config)
    src, tgt = resolve_environments(settings, source, target)  # once, and refused before connecting anywhere
    logger = get_run_logger()
    if check:
        report = check_task(settings, src, tgt)
    else:
        report = refresh(settings, src, tgt, steps=PrefectSteps, progress=logger.info)
    publish_markdown(f"refresh-{tgt.name}", render(report), report.summary())
    return as_dict(report)


# -- the refresh's steps as Prefect tasks: refresh() runs them in its order -------------------------
# They take live objects (the open source snapshot, the leak-scan workspace): the flow runs
# them in its own process, and every reader must share the snapshot the flow holds open, so
# they run once; only the steps that open their own connections and may run twice retry.


@task(name="check-refresh", **RETRY_TRANSIENT)
def check_task(settings: Settings, source: Environment, target: Environment) -> RefreshReport:
    return check_refresh(settings, source, target)


@task(name="plan-refresh", **RUN_ONCE)
def plan_task(settings: Settings, snap: SourceSnapshot, source: Environment, target: Environment) -> RefreshPlan:
    return plan_and_guard(settings, snap, source, target)


@task(name="discard-leftover-copies", **RETRY_TRANSIENT)
def discard_leftovers_task(target: Environment) -> list[str]:
    return discard_leftovers(target)


@task(name="create-copy", **RUN_ONCE)
def create_copy_task(settings: Settings, plan: RefreshPlan, snap: SourceSnapshot, target: Environment) -> NewCopy:
    return create_copy(settings, plan, snap, target)


@task(name="source-checksums", **RUN_ONCE)
def source_checksums_task(settings: Settings, plan: RefreshPlan, snap: SourceSnapshot) -> dict:
    return source_checksums(settings, plan, snap)


@task(name="copy-tables", **RUN_ONCE)
def copy_data_task(plan: RefreshPlan, snap: SourceSnapshot, new: NewCopy, workspace: Workspace,
                   column_ids: ColumnIds, settings: Settings) -> list[CopyResult]:
    return copy_data(plan, snap, new, workspace, column_ids, settings)


@task(name="indexes-and-constraints", **RUN_ONCE)
def finish_copy_task(settings: Settings, plan: RefreshPlan, new: NewCopy) -> None:
    finish_copy(settings, plan, new)


@task(name="validate-copy", **RUN_ONCE)
def validate_copy_task(plan: RefreshPlan, new: NewCopy, results: list[CopyResult], expected: dict, actual: dict,
                       matches: Matches, column_ids: ColumnIds) -> tuple[list[str], list[str], LeakReport]:
    return validate_copy(plan, new, results, expected, actual, matches, column_ids)


@task(name="match-leak-digests", **RUN_ONCE)
def match_leaks_task(plan: RefreshPlan, workspace: Workspace, column_ids: ColumnIds) -> Matches:
    return match_leaks(plan, workspace, column_ids)


@task(name="target-checksums", **RUN_ONCE)
def target_checksums_task(plan: RefreshPlan, new: NewCopy) -> dict:
    return target_checksums(plan, new)


@task(name="switch-to-copy", **RETRY_TRANSIENT)
def switch_task(new: NewCopy, target: Environment) -> None:
    switch(new, target)


class PrefectSteps(PlainSteps):
    """The same steps as Prefect task runs, for the refresh-staging flow."""

    plan = plan_task
    discard_leftovers = discard_leftovers_task
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
        "subset": {t.table: list(t.subset) for t in report.tables if t.subset is not None},
        "masked": [f"{t}.{c}: {rule}" for t, c, rule in report.masked],
        "unmasked_personal": report.unmasked_personal, "defaulted": report.defaulted,
        "suggested": report.suggested, "suggestion_check": report.suggestion_check,
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
        lines.append(f"- discarded copies left by interrupted runs: {', '.join(report.cleaned)}")
    if report.phases:
        lines.append("- time: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.phases.items()))
    if report.unmasked_personal:
        lines += ["", "## Personal-looking columns without a rule (refresh refused)", ""]
        lines += [f"- {f}" for f in report.unmasked_personal]
        if report.suggested:
            lines += ["", "Suggested rules (paste under anonymize.rules in dataops.yaml after review):", "",
                      "```yaml", report.suggested.rstrip("\n"), "```"]
    if report.defaulted:
        lines += ["", "## Masked by anonymize.default", ""] + [f"- {f}" for f in report.defaulted]
    lines += ["", "## Tables", "", markdown_table([t.as_row(report.check_only) for t in report.tables])]
    if report.leaks is not None:
        lines += ["", "## Leak scan", "", markdown_table([c.as_row() for c in report.leaks.columns])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    print(refresh_staging(check="--check" in sys.argv)["summary"])
