"""refresh-staging: production copied into staging with every personal field masked, checked,
and switched in by rename; `check=True` only runs the guards and the rule check."""

from __future__ import annotations

from prefect import flow, get_run_logger

import flows.engine  # noqa: F401  (runs end without a second's wait: see there)
from dataops.settings import load_settings
from tasks.refresh import PrefectSteps, RefreshReport, check_task, refresh
from tasks.refresh_plan import resolve_environments
from tasks.reporting import markdown_table, publish_markdown


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
