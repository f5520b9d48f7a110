"""safe: REINDEX CONCURRENTLY outside a transaction

Lint corpus entry c066 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c066"
down_revision = 'c065'
transactional = False
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
REINDEX INDEX CONCURRENTLY public.users_phone_idx
"""


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
