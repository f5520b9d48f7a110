"""The lint rules as data: severity, why a rule matters, the safe rewrite, and what the peers
(squawk 2.66, Atlas's analyzers) call the same check.

docs/lint-rules.md holds the table `rules_markdown()` prints (`python -m
dataops.tasks.migration.lint_rules`); a test compares the two, so the page cannot drift from the
code. Every squawk rule appears either next to one of ours or in SQUAWK_NOT_ADOPTED with the
reason.
"""

from __future__ import annotations

ERROR, WARNING = "error", "warning"

# rule -> (severity, reason, safe alternative)
RULES: dict[str, tuple[str, str, str]] = {
    # -- statements that lock a live table or rewrite it --------------------------------------------
    "add-not-null-column-without-default": (
        ERROR,
        "adding a NOT NULL column without a default fails on a table that has rows",
        "add it nullable, backfill in batches, add CHECK (col IS NOT NULL) NOT VALID, VALIDATE CONSTRAINT, "
        "then SET NOT NULL (revisions 0005-0008 show it)"),
    "add-column-volatile-default": (
        ERROR,
        "a volatile default (random(), clock_timestamp(), gen_random_uuid()) rewrites the whole table under "
        "ACCESS EXCLUSIVE",
        "add the column without a default, then SET DEFAULT, then backfill in batches"),
    "add-column-rewrite": (
        ERROR,
        "adding a serial, identity or stored generated column fills every existing row: the table and its "
        "indexes are rewritten under ACCESS EXCLUSIVE",
        "add a plain nullable column, attach a sequence default (SET DEFAULT nextval(...)) or fill it with a "
        "trigger for new rows, backfill old rows in batches; a generated value can be a view column instead"),
    "index-not-concurrent": (
        ERROR,
        "building an index on an existing table this way blocks every write to it until the build ends",
        "CREATE [UNIQUE] INDEX CONCURRENTLY in a revision with transactional = False, inside "
        "op.get_context().autocommit_block() (revision 0004 shows it)"),
    "constraint-without-using-index": (
        ERROR,
        "ADD UNIQUE / PRIMARY KEY / EXCLUDE builds its index inside the ALTER TABLE, holding ACCESS EXCLUSIVE "
        "(no reads, no writes) for the whole build",
        "CREATE UNIQUE INDEX CONCURRENTLY first (transactional = False), then ADD CONSTRAINT name UNIQUE USING "
        "INDEX index_name (or PRIMARY KEY USING INDEX), which only takes a brief lock"),
    "drop-index-not-concurrent": (
        ERROR,
        "DROP INDEX takes ACCESS EXCLUSIVE on the index's table: every read and write waits until it commits",
        "DROP INDEX CONCURRENTLY IF EXISTS in a revision with transactional = False, inside "
        "op.get_context().autocommit_block()"),
    "reindex-not-concurrent": (
        ERROR,
        "REINDEX without CONCURRENTLY blocks writes to the table (and reads that would use the index) for the "
        "whole rebuild",
        "REINDEX ... CONCURRENTLY (PostgreSQL 12+) in a revision with transactional = False"),
    "detach-partition-not-concurrent": (
        ERROR,
        "DETACH PARTITION takes ACCESS EXCLUSIVE on the partitioned table: every query on any partition waits",
        "ALTER TABLE ... DETACH PARTITION ... CONCURRENTLY (PostgreSQL 14+) in a revision with "
        "transactional = False"),
    "concurrently-in-transaction": (
        ERROR,
        "CONCURRENTLY cannot run inside a transaction block: the revision would fail",
        "set transactional = False in the revision and put the statement in op.get_context().autocommit_block()"),
    "vacuum-full": (
        ERROR,
        "VACUUM FULL rewrites the table and its indexes under ACCESS EXCLUSIVE: no reads or writes until it ends "
        "(and it cannot run in a transaction)",
        "plain VACUUM (no lock on readers or writers); to give space back online use pg_repack or "
        "pg_squeeze, outside the migration"),
    "cluster": (
        ERROR,
        "CLUSTER rewrites the table in index order under ACCESS EXCLUSIVE: no reads or writes until it ends",
        "pg_repack --order-by (online), outside the migration; or accept the outage in a maintenance window "
        "and allow the rule"),
    "set-logged": (
        ERROR,
        "SET LOGGED / SET UNLOGGED rewrites the whole table (and writes it to WAL) under ACCESS EXCLUSIVE",
        "create the new table with the wanted persistence, copy in batches, switch names in a short "
        "transaction; or allow the rule in a maintenance window"),
    "column-type-change": (
        ERROR,
        "changing a column's type rewrites the table and its indexes under ACCESS EXCLUSIVE (all but a few "
        "binary-compatible changes)",
        "expand/contract: add a new column, write both, backfill in batches, switch reads, drop the old one in a "
        "later revision; if the change is rewrite-free (varchar(n) to a larger n or to text), allow it"),
    "constraint-not-valid": (
        ERROR,
        "adding a FOREIGN KEY or CHECK scans the whole table while holding a lock that blocks writes "
        "(a foreign key locks the referenced table too)",
        "ADD CONSTRAINT ... NOT VALID (instant), then VALIDATE CONSTRAINT in a later revision "
        "(revisions 0007 and 0008 show it)"),
    "domain-constraint": (
        ERROR,
        "ALTER DOMAIN ... ADD CONSTRAINT checks every column of every table that uses the domain, under locks "
        "that block writes to all of them",
        "ADD CONSTRAINT ... NOT VALID, then ALTER DOMAIN ... VALIDATE CONSTRAINT in a later revision; or put a "
        "CHECK on the tables themselves"),
    "validate-in-same-transaction": (
        WARNING,
        "validating in the transaction that added the constraint keeps the ADD's strong lock through the scan",
        "VALIDATE CONSTRAINT in a later revision"),
    "set-not-null-scan": (
        WARNING,
        "SET NOT NULL scans the whole table under ACCESS EXCLUSIVE unless a valid CHECK (col IS NOT NULL) exists",
        "add CHECK (col IS NOT NULL) NOT VALID, VALIDATE it, then SET NOT NULL (revisions 0007 and 0008)"),
    "create-trigger": (
        WARNING,
        "CREATE TRIGGER on an existing table takes SHARE ROW EXCLUSIVE (writes wait behind it and it waits "
        "behind every open transaction on the table), and from its commit every write of the running "
        "application runs the trigger's code",
        "keep the trigger function small and tested; create it in a revision of its own so lock_timeout "
        "retries only it; on a busy table allow the rule after checking the function"),
    "truncate-cascade": (
        ERROR,
        "TRUNCATE ... CASCADE also empties every table that references this one, recursively, under ACCESS "
        "EXCLUSIVE on all of them: data loss beyond the table named",
        "TRUNCATE the named tables only (it fails while others reference them), or DELETE in batches"),
    # -- statements that break the running application -------------------------------------------------
    "drop-column": (
        ERROR,
        "code that is still running may read or write the column; dropping it breaks those queries at once",
        "expand/contract: stop using the column in the application and deploy that first, then drop it in a "
        "later revision and allow it there"),
    "drop-table": (
        ERROR,
        "code that is still running may use the table; dropping it breaks those queries at once",
        "expand/contract: stop using the table in the application and deploy that first, then drop it in a "
        "later revision and allow it there"),
    "drop-schema": (
        ERROR,
        "dropping a schema drops (with CASCADE) or refuses on everything in it; running code that uses any of "
        "it breaks at once",
        "drop the objects one by one in revisions that each follow a deploy that stopped using them, then the "
        "empty schema (allow the rule there)"),
    "drop-database": (
        ERROR,
        "a migration that drops a database destroys everything in it; it also cannot run in a transaction",
        "drop databases by hand, after a backup, never from a migration"),
    "drop-foreign-key": (
        WARNING,
        "without the foreign key nothing stops rows that point nowhere; the application may rely on it "
        "(and ON DELETE CASCADE stops cascading)",
        "drop it only when the application no longer relies on it; to change one, add the new one NOT VALID "
        "and VALIDATE it before dropping the old"),
    "drop-not-null": (
        WARNING,
        "from the commit on, NULLs can appear in the column and running code that assumes a value breaks",
        "make every reader cope with NULL and deploy that first, then drop NOT NULL (allow the rule there)"),
    "rename-column": (
        ERROR,
        "running code still uses the old name and fails as soon as the rename commits",
        "expand/contract: add the new column, write both, backfill, switch reads, drop the old one later"),
    "rename-table": (
        ERROR,
        "running code still uses the old name and fails as soon as the rename commits",
        "expand/contract: create the new table (or a view with the new name), switch the application, "
        "drop the old name later"),
    "enum-value-used-in-transaction": (
        ERROR,
        "a value added with ALTER TYPE ... ADD VALUE cannot be used before its transaction commits "
        "(\"unsafe use of new value\"): the revision fails",
        "add the value in one revision, use it in a later one"),
    "unique-index-existing-data": (
        WARNING,
        "a unique index or constraint built on rows that already exist fails if any are duplicates "
        "(a concurrent build then leaves an INVALID index, which dataops drops on the next run)",
        "run the query in this finding against the database first and fix the duplicates in an earlier "
        "revision; then allow the rule"),
    "identifier-too-long": (
        ERROR,
        "PostgreSQL cuts identifiers to 63 bytes without an error: the object gets another name than the one "
        "written, and a later revision or query that uses the full name fails",
        "use a name of at most 63 bytes"),
    "transaction-control": (
        ERROR,
        "BEGIN, COMMIT or ROLLBACK in a revision's own SQL ends the transaction dataops opened for it: the rest "
        "runs without lock_timeout's retry and a failure leaves half a revision",
        "remove it; for statements that need autocommit use transactional = False and "
        "op.get_context().autocommit_block()"),
    "lock-timeout": (
        ERROR,
        "a statement that takes a strong lock without lock_timeout waits behind long transactions and every "
        "query queues behind it: the table is down while it waits",
        "SET lock_timeout = '5s' first (dataops does this itself for every revision it runs; this fires for SQL "
        "linted to run elsewhere, or when a revision turns the timeout off)"),
    "psql-meta-command": (
        WARNING,
        "a psql script's `\\i`, `\\connect` or `\\gexec` runs SQL the lint does not see (other meta-commands "
        "and COPY ... FROM stdin data are skipped silently: they are not SQL)",
        "lint the included file too (`lint --sql` on it), or the SQL that \\gexec builds"),
    # -- the revision graph ------------------------------------------------------------------------------
    "multiple-heads": (
        ERROR,
        "the revisions have more than one head: dataops (and `alembic upgrade head`) cannot tell which line "
        "of history to apply",
        "give one head the other as down_revision so history is a single line, then lint again"),
    "missing-downgrade": (
        ERROR,
        "the rollback flow undoes a failed migration with downgrade(); without one the only way back is "
        "restoring the backup, which loses every write since",
        "write downgrade() so that it undoes upgrade() exactly; `dataops migrate ENV test` proves it"),
    "unused-allow": (
        WARNING,
        "a `# dataops: allow=` comment names a rule that did not fire (or does not exist): it would silently "
        "allow that rule later",
        "remove the name from the comment"),
    "unparsable-sql": (
        ERROR,
        "PostgreSQL's parser (pglast) cannot parse the statement, so nothing in it was checked",
        "fix the SQL; run `dataops migrate ENV plan` to see what the revision renders"),
    # -- type hygiene (warnings) -----------------------------------------------------------------------
    "prefer-bigint-key": (
        WARNING,
        "an int/smallint/serial key runs out at 2^31 (or 2^15); widening it later rewrites the table and every "
        "table that references it",
        "bigint (bigint GENERATED BY DEFAULT AS IDENTITY) for primary keys and identity columns"),
    "prefer-identity": (
        WARNING,
        "serial makes a separately owned sequence: grants, dumps and copying the table need care, and the "
        "column's default can drift from it",
        "bigint GENERATED BY DEFAULT AS IDENTITY"),
    "timestamp-without-time-zone": (
        WARNING,
        "timestamp without time zone stores the wall-clock reading and drops the offset: the same instant from "
        "two zones reads as two",
        "timestamptz"),
    "char-field": (
        WARNING,
        "char(n) pads with blanks, compares ignoring them and is no faster than text",
        "text (with a CHECK on length if one is needed) or varchar(n)"),
}

# rule -> (squawk 2.66 rule names, Atlas analyzer codes); "" where the peer has none.
PEERS: dict[str, tuple[str, str]] = {
    "add-not-null-column-without-default": ("adding-required-field", "MF103"),
    "add-column-volatile-default": ("adding-field-with-default", "PG302"),
    "add-column-rewrite": ("adding-field-with-default, adding-serial-primary-key-field", ""),
    "index-not-concurrent": ("require-concurrent-index-creation", "PG101"),
    "constraint-without-using-index": ("disallowed-unique-constraint, adding-serial-primary-key-field", ""),
    "drop-index-not-concurrent": ("require-concurrent-index-deletion", "PG102"),
    "reindex-not-concurrent": ("require-concurrent-reindex", ""),
    "detach-partition-not-concurrent": ("require-concurrent-partition-detach", ""),
    "concurrently-in-transaction": ("ban-concurrent-index-creation-in-transaction", "PG103"),
    "vacuum-full": ("", ""),
    "cluster": ("prefer-repack (PostgreSQL 19+ only)", ""),
    "set-logged": ("", ""),
    "column-type-change": ("changing-column-type", "PG301"),
    "constraint-not-valid": ("constraint-missing-not-valid, adding-foreign-key-constraint", ""),
    "domain-constraint": ("ban-alter-domain-with-add-constraint", ""),
    "validate-in-same-transaction": ("constraint-missing-not-valid", ""),
    "set-not-null-scan": ("adding-not-nullable-field", "MF104"),
    "create-trigger": ("", ""),
    "truncate-cascade": ("ban-truncate-cascade", ""),
    "drop-column": ("ban-drop-column", "DS103"),
    "drop-table": ("ban-drop-table", "DS102"),
    "drop-schema": ("", "DS101"),
    "drop-database": ("ban-drop-database", ""),
    "drop-foreign-key": ("", "CD101"),
    "drop-not-null": ("ban-drop-not-null", ""),
    "rename-column": ("renaming-column", "BC102"),
    "rename-table": ("renaming-table", "BC101"),
    "enum-value-used-in-transaction": ("", ""),
    "unique-index-existing-data": ("", "MF101, MF102"),
    "identifier-too-long": ("identifier-too-long", ""),
    "transaction-control": ("transaction-nesting, ban-uncommitted-transaction", ""),
    "lock-timeout": ("require-lock-timeout, require-timeout-settings", ""),
    "multiple-heads": ("", "(migrate lint: non-linear changes)"),
    "missing-downgrade": ("", ""),
    "unused-allow": ("unused-ignore", ""),
    "unparsable-sql": ("(syntax error)", ""),
    "psql-meta-command": ("", ""),
    "prefer-bigint-key": ("prefer-bigint-over-int, prefer-bigint-over-smallint", ""),
    "prefer-identity": ("prefer-identity", ""),
    "timestamp-without-time-zone": ("prefer-timestamp-tz", ""),
    "char-field": ("ban-char-field", ""),
}

# squawk rules with no dataops rule of their own, and why (PostgreSQL 14 and later).
SQUAWK_NOT_ADOPTED: dict[str, str] = {
    "require-statement-timeout": (
        "dataops sets statement_timeout (migrations.statement_timeout) for every revision it runs, on the "
        "session and again with SET LOCAL inside each revision's transaction; a long statement is cancelled and "
        "its revision rolled back"),
    "prefer-robust-stmts": (
        "asks for IF [NOT] EXISTS so that a half-applied file can be rerun. dataops runs a transactional "
        "revision in one transaction (all or nothing); for a transactional = False revision it drops the "
        "INVALID indexes a killed run left and runs the downgrade of an unrecorded revision before going on"),
    "prefer-text-field": (
        "varchar(n) is not a lock problem on PostgreSQL 14+: making n larger (or switching to text) is a "
        "catalog change without rewrite; dataops still flags every type change (column-type-change), which is "
        "where the lock is"),
    "prefer-bigint-over-int": (
        "folded into prefer-bigint-key, which warns where overflow stops inserts (keys and identity/serial "
        "columns), not on every int column (a quantity or a percentage)"),
    "prefer-bigint-over-smallint": ("folded into prefer-bigint-key (see prefer-bigint-over-int)"),
    "require-enum-value-ordering": (
        "ADD VALUE without BEFORE/AFTER appends at the end: an ordering question for code that sorts or "
        "compares enum values, not a lock or a break; what does break (using the new value in the same "
        "transaction) is enum-value-used-in-transaction"),
    "ban-create-domain-with-constraint": (
        "a new domain is used by nothing yet, so its CHECK costs nothing; adding a constraint to a domain in "
        "use is what scans tables (domain-constraint)"),
    "require-table-schema": (
        "opt-in in squawk; dataops's revisions name the schema by convention and lint reads unqualified names "
        "as public"),
    "ban-duplicate-column-assignments": (
        "PostgreSQL itself rejects UPDATE ... SET a = 1, a = 2 (\"multiple assignments to same column\"), so "
        "`dataops migrate ENV test` fails on it before any deploy"),
}


def rules_markdown() -> str:
    """The table in docs/lint-rules.md (between its BEGIN/END RULES markers)."""
    lines = ["| rule | squawk 2.66 | Atlas | severity | why / the safe rewrite |",
             "|---|---|---|---|---|"]
    for rule, (severity, reason, alternative) in RULES.items():
        squawk, atlas = PEERS[rule]
        lines.append(f"| `{rule}` | {_code(squawk)} | {atlas or '-'} | {severity} | {reason}. "
                     f"Instead: {alternative} |")
    lines += ["", "squawk rules without a dataops rule of their own:", "",
              "| squawk 2.66 | ours | why not |", "|---|---|---|"]
    for name, why in SQUAWK_NOT_ADOPTED.items():
        ours = next((r for r, (sq, _) in PEERS.items() if name in sq.split(", ")), "")
        lines.append(f"| `{name}` | {'`' + ours + '`' if ours else '-'} | {why} |")
    return "\n".join(lines)


def _code(names: str) -> str:
    if not names:
        return "-"
    return ", ".join(f"`{n}`" if n[0].isalpha() and " " not in n else n for n in names.split(", "))


def squawk_rules_covered() -> dict[str, str]:
    """squawk rule -> what dataops does about it (our rule, or the reason it has none)."""
    out: dict[str, str] = {}
    for rule, (squawk, _) in PEERS.items():
        for name in squawk.split(", "):
            name = name.split(" ")[0]
            if name and name[0].isalpha():
                out.setdefault(name, rule)
    for name in SQUAWK_NOT_ADOPTED:
        out.setdefault(name, "not adopted")
    return out


if __name__ == "__main__":
    print(rules_markdown())
