"""Which faults are retried: transient ones (network, 5xx, lock timeouts), never bad input."""

from __future__ import annotations

import psycopg
import pytest
from conftest import free_port

from dataops.dsn import Dsn
from dataops.errors import BadInput, OperationFailed, TransientError, is_transient
from dataops.tasks import pg


def test_unreachable_server_is_transient_and_names_the_fix():
    dsn = Dsn(f"postgresql://app:TopSecret99@127.0.0.1:{free_port()}/app")
    with pytest.raises(TransientError) as err:
        with pg.connect(dsn, timeout=2):
            pass
    assert is_transient(err.value)
    assert "check that the server is running and database_url is right" in err.value.message
    assert "TopSecret99" not in err.value.message


def test_missing_database_is_bad_input(pg_server_dsn):
    with pytest.raises(BadInput, match='database "no_such_db" does not exist'):
        with pg.connect(pg_server_dsn.with_database("no_such_db")):
            pass


def test_lock_timeout_is_transient_and_unknown_errors_are_not(db):
    with pg.connect(db) as a, pg.connect(db) as b:
        a.execute("CREATE TABLE t (id int)")
        a.commit()
        a.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        b.execute("SET lock_timeout = '100ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable) as err:
            b.execute("SELECT * FROM t")
        assert is_transient(err.value)
    assert not is_transient(ValueError("bad"))
    assert not is_transient(BadInput("bad"))
    assert not is_transient(OperationFailed("checksum mismatch"))


def test_unreachable_s3_is_transient():
    from dataops.settings import StorageSettings
    from dataops.tasks.backup.storage import S3Storage

    storage = S3Storage(StorageSettings(url="s3://b/p", endpoint_url=f"http://127.0.0.1:{free_port()}",
                                        region="us-east-1", access_key_id="x", secret_access_key="y"))
    with pytest.raises(TransientError, match="cannot reach the S3 endpoint"):
        storage.check()


def test_errors_keep_their_kind_through_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(TransientError("retry me")))
    assert isinstance(err, TransientError) and is_transient(err) and err.message == "retry me"


# -- row-level security: an error, never a filter -------------------------------------------------

def test_every_connection_turns_row_security_off_keeping_the_users_options(db):
    dsn = Dsn(psycopg.conninfo.make_conninfo(db.secret(), options="-c statement_timeout=7s"))
    conninfo, env = dsn.libpq_args()
    assert "-c statement_timeout=7s -c row_security=off" in conninfo and "password" not in conninfo
    assert dsn.conninfo(options="-c work_mem=8MB").count("row_security=off") == 1
    with pg.connect(dsn) as conn:
        assert conn.execute("SELECT current_setting('row_security'), current_setting('statement_timeout')"
                            ).fetchone() == ("off", "7s")
    with psycopg.connect(dsn.conninfo()) as conn:  # anyone's connection made from the DSN, not only ours
        assert conn.execute("SHOW row_security").fetchone()[0] == "off"


def test_a_row_security_refusal_is_bad_input_naming_the_table_and_the_fix():
    from dataops.errors import classify, row_security_error

    stderr = ('pg_dump: error: query failed: ERROR:  query would be affected by row-level security policy for '
              'table "Odd ""Notes"""\npg_dump: detail: Query was: COPY ...')
    err = row_security_error(stderr, role="reporting")
    assert isinstance(err, BadInput) and err.exit_code == 2
    assert err.message == ('row-level security on table "Odd "Notes"" would hide rows from role reporting; '
                           "grant the role BYPASSRLS, or connect as the table's owner")
    assert row_security_error("permission denied for table users") is None
    other = ValueError("something else")
    assert classify(other) is other and classify(BadInput("x")).message == "x"
