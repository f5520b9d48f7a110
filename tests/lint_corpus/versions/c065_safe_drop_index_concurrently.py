"""safe: DROP INDEX CONCURRENTLY outside a transaction

Lint corpus entry c065 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c065"
down_revision = 'c064'
transactional = False
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
DROP INDEX CONCURRENTLY IF EXISTS public.users_phone_idx
"""


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
