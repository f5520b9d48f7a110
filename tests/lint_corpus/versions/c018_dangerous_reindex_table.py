"""dangerous: REINDEX TABLE without CONCURRENTLY

Lint corpus entry c018 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c018"
down_revision = 'c017'
transactional = False
EXPECT = "dangerous"
EXPECT_RULES = ('reindex-not-concurrent',)
SQL = """
REINDEX TABLE public.users
"""


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
