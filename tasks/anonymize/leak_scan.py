"""Proof that masking happened: no value of a masked source column reaches the target.

What is compared: every masked source value and every value the masking wrote, as 64-bit
keyed digests (HMAC-SHA256 by the salt, the one the masking computes anyway). A written
value whose digest equals the digest of any source value of any masked column is a leak.
Digests, not values, so that nothing readable is kept, and 8 bytes a value.

Bounded memory whatever the table size: digests go to files on local disk, split into
partitions by their top bits (sized so one partition holds about 1M digests, 8 MB), and
each partition is matched on its own (sorted, then a binary search per written digest).
The match is exact on the 64-bit digests; two different values share a digest with odds
of about n*m/2^64.

What is not a leak, and is reported separately:
- a value a rule maps to itself (a row's Faker pick that equals its own value, a partial
  mask of a value with nothing to mask, an infinite date): counted per column as unchanged;
- a Faker pool entry that equals some real value (the pool holds common names, and so does
  production): counted per column as pool coincidences, since the entry came from Faker,
  not from the source.
Date shifts are checked per row (unchanged rows) but not across rows: shifted birth dates
are other people's birth dates by construction. Null and constant rules are checked on the
target by SQL (no value but NULL, or the constant).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy only where digests are matched: copy workers never load it
    import numpy as np

TARGET_PER_PARTITION = 1_000_000
FLUSH_BYTES = 1 << 20


def partition_bits(expected_values: int) -> int:
    """Top bits to split on so that one partition holds about TARGET_PER_PARTITION digests."""
    parts = max(1, math.ceil(expected_values / TARGET_PER_PARTITION))
    return min(16, max(0, math.ceil(math.log2(parts))))


def short(d: bytes) -> bytes:
    """The 8 bytes of a 32-byte digest kept for matching (the masking uses the first 15)."""
    return d[24:32]


class Collector:
    """Digests of one copy job, appended to partition files under `directory`.

    A digest goes straight into the bytearray of its partition (the low 16 bits of the
    8-byte little-endian digest, shifted: the same split `Workspace.match` makes with
    numpy), so a worker needs no numpy and a flush is plain file appends. `add_output`
    takes a 2-byte column id with each output digest. Buffers are flushed at 1 MB.
    """

    def __init__(self, directory: str, job: str, bits: int):
        # a file name whatever the table is called ("a/b" is a valid quoted name): readable part and a hash
        safe = re.sub(r"[^A-Za-z0-9_.]", "_", job)[:40] + "_" + hashlib.sha256(job.encode()).hexdigest()[:8]
        self.dir, self.job, self.bits = directory, safe, bits
        self.shift = 16 - bits
        n = 1 << bits
        self.src = [bytearray() for _ in range(n)]
        self.out = [bytearray() for _ in range(n)]
        self.out_col = [bytearray() for _ in range(n)]
        self.pending = 0

    def add_source(self, short_digest: bytes) -> None:
        self.src[(short_digest[0] | short_digest[1] << 8) >> self.shift] += short_digest
        self.pending += 8

    def add_output(self, short_digest: bytes, col: bytes) -> None:
        p = (short_digest[0] | short_digest[1] << 8) >> self.shift
        self.out[p] += short_digest
        self.out_col[p] += col
        self.pending += 10

    def flush(self, final: bool = False) -> None:
        if not self.pending or (not final and self.pending < FLUSH_BYTES):
            return
        for name, suffix, bufs in (("src", ".d", self.src), ("out", ".d", self.out), ("out", ".c", self.out_col)):
            for p, buf in enumerate(bufs):
                if buf:
                    with open(os.path.join(self.dir, f"{name}-{p}-{self.job}{suffix}"), "ab") as f:
                        f.write(buf)
                    buf.clear()
        self.pending = 0


def partition_of(digests: np.ndarray, bits: int) -> np.ndarray:
    """The partition of each short digest, as Collector computes it byte by byte."""
    import numpy as np

    return ((digests & np.uint64(0xFFFF)) >> np.uint64(16 - bits)).astype(np.int64)


@dataclass
class ColumnLeaks:
    table: str
    column: str
    rule: str
    checked: int = 0  # written values compared with the source values
    leaked: int = 0  # written values equal to a masked source value
    unchanged: int = 0  # rows the rule mapped to themselves
    pool_coincidences: int | None = None  # Faker pool entries equal to some source value
    note: str = ""

    def as_row(self) -> dict:
        return {"table": self.table, "column": self.column, "rule": self.rule, "checked": self.checked,
                "leaked": self.leaked, "unchanged": self.unchanged,
                "pool coincidences": "" if self.pool_coincidences is None else self.pool_coincidences,
                "note": self.note}


@dataclass
class LeakReport:
    columns: list[ColumnLeaks] = field(default_factory=list)
    source_values: int = 0

    @property
    def leaked(self) -> int:
        return sum(c.leaked for c in self.columns)

    @property
    def checked(self) -> int:
        return sum(c.checked for c in self.columns)

    @property
    def ok(self) -> bool:
        return self.leaked == 0

    def summary(self) -> str:
        unchanged = sum(c.unchanged for c in self.columns)
        pooled = sum(c.pool_coincidences or 0 for c in self.columns)
        verdict = "0 leaked values" if self.ok else f"{self.leaked:,} LEAKED values in " + ", ".join(
            f"{c.table}.{c.column}" for c in self.columns if c.leaked)
        return (f"leak scan: {verdict} ({self.checked:,} written values of {len(self.columns)} masked columns "
                f"checked against {self.source_values:,} source values; {unchanged:,} unchanged by their rule, "
                f"{pooled:,} Faker pool entries also found in the source)")


class Workspace:
    """A private folder for the digest files of one run, removed afterwards."""

    def __init__(self, expected_values: int):
        self.bits = partition_bits(expected_values)
        self.path = tempfile.mkdtemp(prefix="dataops-leakscan-")
        os.chmod(self.path, 0o700)

    def collector(self, job: str) -> Collector:
        return Collector(self.path, job, self.bits)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def match(self, n_columns: int, pools: dict[int, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """(leaks per column id, pool coincidences per column id, source values seen)."""
        import numpy as np

        files: dict[tuple[str, int], list[Path]] = defaultdict(list)
        for f in Path(self.path).glob("*.d"):
            kind, part, _ = f.name.split("-", 2)
            files[(kind, int(part))].append(f)
        leaks = np.zeros(n_columns, dtype=np.int64)
        pooled = np.zeros(n_columns, dtype=np.int64)
        source_values = 0
        pool_parts = {col: (digests, partition_of(digests, self.bits)) for col, digests in (pools or {}).items()}
        for p in range(1 << self.bits):
            src_files = files.get(("src", p), [])
            if not src_files:
                continue
            src = np.sort(np.concatenate([np.fromfile(f, dtype="<u8") for f in src_files]))
            source_values += len(src)
            for f in files.get(("out", p), []):
                out = np.fromfile(f, dtype="<u8")
                cols = np.fromfile(f.with_suffix(".c"), dtype="<u2")
                hit = _found(src, out)
                if hit.any():
                    leaks += np.bincount(cols[hit], minlength=n_columns)[:n_columns]
            for col, (digests, part) in pool_parts.items():
                mine = digests[part == p]
                if len(mine):
                    pooled[col] += int(_found(src, mine).sum())
        return leaks, pooled, source_values


def _found(sorted_src: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Which values occur in sorted_src (duplicates allowed). A binary search per value:
    4x less CPU than np.unique + np.isin, which sort both sides."""
    import numpy as np

    at = np.searchsorted(sorted_src, values)
    at[at == len(sorted_src)] = 0
    return sorted_src[at] == values if len(sorted_src) else np.zeros(len(values), dtype=bool)


def digests_of(keyed, values: list[str]) -> np.ndarray:
    """Short digests of text values (pool entries, constants), as matched above."""
    import numpy as np

    return np.frombuffer(b"".join(short(keyed.digest(v.encode())) for v in values), dtype="<u8")


@dataclass
class Matches:
    """What the digest files hold, matched: the slow part of a report, kept apart so that
    a refresh can run it beside the index builds (it needs only the files)."""

    leaked: np.ndarray  # written values equal to a masked source value, per column id
    pooled: np.ndarray  # Faker pool entries equal to some source value, per column id
    source_values: int


def match_digests(masking, names: list[tuple[str, str]], workspace: Workspace) -> Matches:
    """Match every written digest (and every non-unique Faker pool) against the source's.
    `names[i]` is the (table, column) of column id i."""
    import numpy as np

    maskers = [masking.tables[t].maskers[c] for t, c in names]
    pools = {i: np.unique(digests_of(masking.keyed, m.pool)) for i, m in enumerate(maskers)
             if m.kind == "faker" and not m.unique}
    return Matches(*workspace.match(len(names), pools))


def build_report(masking, names: list[tuple[str, str]], unchanged: dict[int, int], values: dict[int, int],
                 matches: Matches, sql_checked: dict[str, tuple[int, int]],
                 counted_by_sql: set[int] = frozenset()) -> LeakReport:
    """The leak report of one run. `names[i]` is the (table, column) of column id i;
    `unchanged` counts values per column id that their rule left as they were; `values`
    counts the non-NULL values masked in Python per column id; `matches` comes from
    match_digests; `sql_checked` has (rows, bad values) of the null and constant columns,
    which the target was checked for by SQL; `counted_by_sql` are the column ids PostgreSQL masked
    in the copy's SELECT with no row passing through Python (Masker.row_free): their values were
    counted by SQL and not compared one by one."""
    maskers = [masking.tables[t].maskers[c] for t, c in names]
    leaked, pooled = matches.leaked, matches.pooled
    report = LeakReport(source_values=matches.source_values)
    for i, ((table, column), m) in enumerate(zip(names, maskers)):
        c = ColumnLeaks(table, column, m.label, unchanged=unchanged.get(i, 0))
        if m.kind in ("null", "constant"):
            c.checked, c.leaked = sql_checked.get(f"{table}.{column}", (0, 0))
            c.note = "checked in the target: only NULL" if m.kind == "null" else "checked in the target: only the constant"
        elif i in counted_by_sql:
            c.checked, c.unchanged = values.get(i, 0), 0
            c.note = ("masked by PostgreSQL in the copy's SELECT, values counted there; not compared one by one: "
                      "its outputs may equal other rows' values by design")
        elif m.kind == "shift_days":
            c.checked = values.get(i, 0)
            c.note = "compared per row: every date moved"
        elif m.kind != "faker" and not m.track_output:  # noise, generalize, choice, some cases: many-to-one or
            c.checked = values.get(i, 0)                  # moved values, which other rows may hold by design
            c.note = {"noise": "compared per row: values moved by the noise",
                      "generalize": "compared per row: values coarsened (many share one by design)",
                      "choice": "compared per row: values come from the choice list"}.get(
                m.kind, f"compared per row: some of its {m.kind} rules give values other rows may hold")
        else:
            c.leaked = int(leaked[i])
            if m.kind == "faker" and not m.unique:
                c.checked, c.pool_coincidences = len(m.pool), int(pooled[i])
                c.note = "values come from the Faker pool: pool entries compared"
            else:
                c.checked = values.get(i, 0) - c.unchanged
        report.columns.append(c)
    return report
