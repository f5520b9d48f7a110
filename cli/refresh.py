"""`dataops refresh-staging` and `dataops anonymize ENV`: masked copies of production data.

refresh-staging runs the refresh-staging flow (plan, copy with masking, checks, switch);
`--check` stops after the guards and the rule check and exits 2 when a personal-looking
column has no rule, so CI can run it whenever the schema changes; it then prints rules for
those columns as YAML to paste under anonymize.rules (a suggestion: nothing is applied).
`anonymize ENV --report [PATH]` also prints a masking report (counts only) and writes it to
PATH as JSON or Markdown. anonymize runs the
anonymize-database flow on a non-production database.
"""

from __future__ import annotations

from typing import Optional

import typer

from dataops.cli.app import app, echo, load_cli_settings, state
from dataops.errors import BadInput, SafetyRefusal


@app.command("refresh-staging")
def refresh_staging_cmd(
        source: Optional[str] = typer.Option(None, "--source", help="environment to copy (default: the one with role "
                                             "production)", show_default=False),
        target: Optional[str] = typer.Option(None, "--target", help="environment to replace (default: the one with "
                                             "role staging)", show_default=False),
        check: bool = typer.Option(False, "--check", help="check the guards and masking rules, copy nothing")):
    """Replace staging with a masked copy of production, checked before it is switched in."""
    settings = load_cli_settings(*[name for name in (source, target) if name])
    from dataops.tasks.refresh.plan import resolve_environments

    src, tgt = resolve_environments(settings, source, target)
    if check:  # only reads: no flow run, no Prefect API started
        from dataops.flows.refresh_staging import as_dict
        from dataops.tasks.refresh.steps import check_refresh

        r = as_dict(check_refresh(settings, src, tgt))
    else:
        from dataops.flows.refresh_staging import refresh_staging

        r = refresh_staging(src.name, tgt.name, check=check, config=state.config)
    if check:
        for line in r["masked"]:
            echo(f"masked  {line}")
        for line in r["defaulted"]:
            echo(f"default {line}")
        for line in r["unmasked_personal"]:
            echo(f"NO RULE {line}")
        for table, (kept, total) in r["subset"].items():
            echo(f"subset  {table}: {kept:,} of {total:,} rows")
        if r.get("suggested"):
            echo("")
            echo("Suggested rules (review, then paste under anonymize.rules in dataops.yaml; nothing was applied):")
            echo(r["suggested"].rstrip("\n"))
            if r.get("suggestion_check"):
                echo(f"# note: with these rules the rule check still says: {r['suggestion_check']}")
            echo("")
        echo(r["summary"])
        if r["unmasked_personal"]:
            raise SafetyRefusal(f"{len(r['unmasked_personal'])} personal-looking column(s) have no masking rule "
                                "(listed above); add rules under anonymize.rules in dataops.yaml")
        return
    width = max(len(t) for t in r["tables"]) if r["tables"] else 5
    for table, rows in r["tables"].items():
        echo(f"{table.ljust(width)}  {rows:>12,} rows")
    for line in r["checks"]:
        echo(line)
    echo(r["leak_scan"]["summary"])
    echo(r["summary"])


@app.command("anonymize")
def anonymize_cmd(env: str = typer.Argument(..., help="environment to anonymize in place (never production)",
                                            show_default=False),
                  path: Optional[str] = typer.Argument(None, metavar="[PATH]", show_default=False,
                                                       help="with --report: write the report to this .json or .md "
                                                       "file"),
                  report: bool = typer.Option(False, "--report", help="also write a masking report: per masked "
                                              "column the rule, distinct values before and after, uniqueness kept "
                                              "(counts only, never values)")):
    """Apply the masking rules of dataops.yaml in place to ENV (a database that already holds a copy)."""
    target = None
    if path is not None:
        if not report:
            raise BadInput(f"unexpected argument {path}; to write a masking report there, add --report")
        from dataops.tasks.anonymize.report import check_report_path

        target = check_report_path(path)  # refused before anything runs
    settings = load_cli_settings(env)
    from dataops.tasks.anonymize.in_place import guard_environment

    guard_environment(settings.env(env))
    from dataops.flows.anonymize_database import anonymize_database

    r = anonymize_database(env, config=state.config, masking_report=report)
    for table, rows in r["tables"].items():
        echo(f"{table}: {rows:,} rows masked" + (f", {r['deleted'][table]:,} deleted" if table in r["deleted"] else ""))
    echo(r["leak_scan"]["summary"])
    if report:
        from dataops.tasks.anonymize.report import MaskingReport, write_report
        from dataops.tasks.reporting import text_table

        masking = MaskingReport.from_dict(r["masking_report"])
        if masking.columns:
            echo(text_table([c.as_row() for c in masking.columns]))
        echo(masking.summary())
        if target is not None:
            write_report(masking, target)
            echo(f"masking report written to {target}")
    echo(r["summary"])
