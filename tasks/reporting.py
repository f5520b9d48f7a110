"""Prefect artifacts: what a flow did, on the run's page in the UI.

Artifacts are built from already-redacted values (DSNs print masked), and creation
failures never fail the operation they describe.
"""

from __future__ import annotations

import logging
import re

from dataops.redact import redact

log = logging.getLogger("dataops.reporting")


def artifact_key(*parts: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


def publish_markdown(key: str, markdown: str, description: str) -> None:
    from prefect.artifacts import create_markdown_artifact  # here: the CLI imports text_table without Prefect

    try:
        create_markdown_artifact(key=artifact_key(key), markdown=redact(markdown), description=redact(description))
    except Exception as exc:  # noqa: BLE001 - a report must not fail the job it reports on
        log.warning("could not publish artifact %s: %s", key, redact(str(exc)))


def publish_table(key: str, rows: list[dict], description: str) -> None:
    from prefect.artifacts import create_table_artifact

    try:
        safe = [{k: redact(str(v)) if isinstance(v, str) else v for k, v in r.items()} for r in rows]
        create_table_artifact(key=artifact_key(key), table=safe, description=redact(description))
    except Exception as exc:  # noqa: BLE001
        log.warning("could not publish artifact %s: %s", key, redact(str(exc)))


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "_none_"
    cols = list(rows[0])
    head = "| " + " | ".join(cols) + " |\n| " + " | ".join("---" for _ in cols) + " |\n"
    return head + "".join("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |\n" for r in rows)


def text_table(rows: list[dict]) -> str:
    """Rows as aligned plain-text columns, for the terminal (the artifacts use markdown_table)."""
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    line = lambda r: "  ".join(str(r[c]).ljust(widths[c]) for c in cols).rstrip()  # noqa: E731
    return "\n".join([line({c: c for c in cols}), *(line(r) for r in rows)])
