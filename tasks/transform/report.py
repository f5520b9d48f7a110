"""What a transform run shows on its Prefect run page: a progress bar while it runs, then a
table of counts (changed, skipped as invalid with example keys, unchanged) and the details a
reviewer asks about (longest transaction against the bound, snapshot, checks)."""

from __future__ import annotations

import logging

from dataops.redact import redact
from dataops.tasks.reporting import (
    artifact_key,
    markdown_table,
    publish_markdown,
    publish_table,
)

log = logging.getLogger("dataops.transform")


class ProgressArtifact:
    """A Prefect progress artifact; failures to create or update it never fail the run."""

    def __init__(self, key: str, description: str):
        self.id = None
        try:
            from prefect.artifacts import create_progress_artifact

            self.id = create_progress_artifact(progress=0.0, key=artifact_key(key), description=redact(description))
        except Exception as exc:  # noqa: BLE001
            log.warning("could not create progress artifact %s: %s", key, exc)

    def update(self, percent: float, description: str | None = None) -> None:
        if self.id is None:
            return
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.id, progress=min(max(percent, 0.0), 100.0),
                                     description=redact(description) if description else None)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not update progress artifact: %s", exc)


def count_rows(s: dict) -> list[dict]:
    examples = ", ".join(s["invalid_examples"])
    rows = [
        {"outcome": "changed", "rows": s["changed"], "detail": ""},
        {"outcome": "skipped as invalid", "rows": s["invalid"],
         "detail": f"e.g. keys {examples} (left unchanged)" if examples else ""},
        {"outcome": "unchanged", "rows": s["unchanged"], "detail": "valid, but the change gave the same values"},
    ]
    if s["deleted"]:
        rows.insert(1, {"outcome": "deleted", "rows": s["deleted"], "detail": "kept in the snapshot"})
    if s["inserted"]:
        rows.insert(1, {"outcome": "re-inserted", "rows": s["inserted"], "detail": "rows the transform had deleted"})
    return rows


def publish_summary(s: dict) -> None:
    what = "revert of " if s["action"] == "revert" else ""
    key = f"transform-{s['transform']}-{s['environment']}" + ("-revert" if s["action"] == "revert" else "")
    publish_table(key, count_rows(s), f"{what}{s['transform']} on {s['environment']}: {s['status']}")
    bound = s.get("max_batch_seconds")
    lines = [
        f"# {what.capitalize()}{s['transform']} on {s['environment']}: {s['status']}",
        "",
        f"- table `{s['table']}`, run {s['run_id']}" + (f" (reverts run {s['reverts']})" if s.get("reverts") else ""),
        f"- rows scanned {s['scanned']:,} of {s['rows']:,}; needing work {s['needing_work']:,}",
        f"- {s['batches']:,} batches over {s['ranges']} range(s); longest transaction {s['longest_tx_s']:.3f} s"
        + (f" (bound {bound:g} s)" if bound else ""),
    ]
    if s.get("seconds") is not None:
        lines.append(f"- took {s['seconds']:.1f} s, {s.get('rows_per_s') or 0:,} rows/s; "
                     f"{s['busy_s']:.1f} s inside batch transactions")
    if s.get("snapshot"):
        lines.append(f"- snapshot `dataops_snapshots.{s['snapshot']}`")
    if s["problems"]:
        lines += ["", "## Checks failed", "", *[f"- {p}" for p in s["problems"]]]
    lines += ["", "## Counts", "", markdown_table(count_rows(s))]
    publish_markdown(key + "-details", "\n".join(lines), f"{what}{s['transform']} on {s['environment']}")


def publish_plan(p: dict) -> None:
    lines = [
        f"# Dry run of {p['transform']} on {p['environment']}",
        "",
        f"{p['description']}",
        "",
        f"- {p['kind']} transform of `{p['table']}` (key `{p['key']}`), {p['rows']:,} rows",
        f"- rows needing work: {p['needing_work']:,}; invalid (would be skipped): {p['invalid']:,}"
        + (f", e.g. keys {', '.join(p['invalid_examples'])}" if p["invalid_examples"] else ""),
        f"- ranges: {len(p['ranges'])}; snapshot: {p['snapshot'] or 'none'}; revert: {p['revert']}",
        "",
        "## Preview",
        "",
        markdown_table([{"key": r["key"], "before": r["before"], "after": r["after"]} for r in p["preview"]]),
    ]
    publish_markdown(f"transform-{p['transform']}-{p['environment']}-plan", "\n".join(lines),
                     f"dry run of {p['transform']} on {p['environment']}")
