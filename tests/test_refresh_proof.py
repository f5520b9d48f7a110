"""The refresh's proof that what landed equals what was read, on tables whose rows pass
through Python for masking (users, user_emails): the rows are split, rewritten and joined
there, so a bug in that loop is where a wrong unmasked value would come from. The source
side of the proof stays a checksum computed by PostgreSQL in the snapshot (bench/RESULTS.md,
"Refresh CPU": hashing the streamed rows in Python would cost twice the scan it replaces),
and it must catch a value altered in transit as well as one altered in the target."""
from __future__ import annotations

import pytest
from test_refresh_staging import checksums, run_refresh, scratch_databases, stack  # noqa: F401 - fixture

from dataops.errors import OperationFailed
from dataops.settings import load_settings
from dataops.tasks.refresh import table_copy

USERS_COLUMNS = 12
USERS_CREATED_AT = 10  # users' field index in the COPY text: id, email, ..., password_hash, created_at


def test_a_value_altered_in_transit_fails_the_refresh(stack, pg_server_dsn, monkeypatch):  # noqa: F811
    """One unmasked field of one users row changed between the masking loop and the target:
    the copy holds every row and every masked value is well formed, only the checksum of the
    unmasked columns can tell."""
    prod, stg, config = stack
    before = checksums(stg)
    real = table_copy._masked_stream
    altered = []

    class Tamper:
        def __init__(self, out):
            self.out = out

        def write(self, data):
            row, _, rest = bytes(data).partition(b"\n")
            fields = row.split(b"\t")
            if not altered and len(fields) == USERS_COLUMNS:  # users' first batch (user_emails has 5 columns)
                fields[USERS_CREATED_AT] = fields[USERS_CREATED_AT].replace(b"20", b"19", 1)  # 2023 -> 1923
                altered.append(fields[USERS_CREATED_AT])
                data = b"\t".join(fields) + b"\n" + rest
            return self.out.write(data)

    def tampered(cin, cout, maskers, collector, *rest):
        return real(cin, Tamper(cout), maskers, collector, *rest)

    monkeypatch.setattr(table_copy, "_masked_stream", tampered)
    with pytest.raises(OperationFailed) as err:
        run_refresh(load_settings(config()))
    assert altered, "the users stream was altered"
    assert "table users: checksum of the unmasked columns differs from the source" in err.value.message
    assert "'staging' was left unchanged" in err.value.message
    assert checksums(stg) == before and scratch_databases(pg_server_dsn) == []
