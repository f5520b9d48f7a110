"""bench/RESULTS.md holds one H2 section per benchmark; each script rewrites only its own."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nOne H2 section per script in `bench/`; each script rewrites only its own section.\n"


def write_section(text: str, section: str) -> None:
    """Replace the H2 section titled `section` (re-read just now: other benchmarks may have written
    theirs meanwhile) with `text`, or append it; every other section stays as it is."""
    body = RESULTS.read_text() if RESULTS.exists() else HEADER
    lines = body.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() == section), None)
    if start is None:
        new = body.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        rest = lines[end:]
        new = "\n".join(lines[:start] + text.rstrip("\n").splitlines() + ([""] + rest if rest else [])) + "\n"
    RESULTS.write_text(new)
