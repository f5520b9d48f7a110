"""anonymize-database: the masking rules applied in place to a non-production database."""

from __future__ import annotations

from prefect import flow, get_run_logger

import dataops.flows.engine  # noqa: F401  (runs end without a second's wait: see there)
from dataops.settings import load_settings
from dataops.tasks.anonymize.in_place import AnonymizeReport, anonymize_task, guard_environment
from dataops.tasks.reporting import markdown_table, publish_markdown


@flow(name="anonymize-database")
def anonymize_database(env: str, config: str | None = None, masking_report: bool = False) -> dict:
    """`masking_report`: also count each masked column's distinct values before and after (the masking
    report, published as an artifact and returned under masking_report)."""
    settings = load_settings(config)
    environment = settings.env(env)  # resolved once; the task gets the Environment
    guard_environment(environment)  # refuse production before any task runs
    report: AnonymizeReport = anonymize_task(settings, environment, count=masking_report)
    masking = report.masking
    get_run_logger().info("%s; %s", report.summary(), report.leaks.summary())
    if masking is not None:
        publish_markdown(f"masking-report-{env}", masking.to_markdown(), masking.summary())
    publish_markdown(
        f"anonymize-{env}",
        f"# Anonymized {env} in place\n\n**{report.summary()}**\n\n- {report.leaks.summary()}\n"
        f"- VACUUM FULL of the rewritten tables: {report.vacuum_seconds:.1f} s\n\n## Rows\n\n"
        + markdown_table([{"table": t, "rows updated": n, "rows deleted": report.deleted.get(t, 0)}
                          for t, n in report.tables.items()])
        + "\n## Leak scan\n\n" + markdown_table([c.as_row() for c in report.leaks.columns]),
        report.summary(),
    )
    return {"environment": env, "tables": report.tables, "deleted": report.deleted,
            "masked": [f"{t}.{c}: {rule}" for t, c, rule in report.masked],
            "leak_scan": {"leaked": report.leaks.leaked, "checked": report.leaks.checked,
                          "summary": report.leaks.summary()},
            "seconds": round(report.seconds, 2), "summary": report.summary(),
            "masking_report": None if masking is None else masking.as_dict()}


if __name__ == "__main__":
    import sys

    print(anonymize_database(sys.argv[1])["summary"])
