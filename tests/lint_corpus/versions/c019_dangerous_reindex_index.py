"""dangerous: REINDEX INDEX without CONCURRENTLY

Lint corpus entry c019 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c019"
down_revision = 'c018'
transactional = False
EXPECT = "dangerous"
EXPECT_RULES = ('reindex-not-concurrent',)
SQL = """
REINDEX INDEX public.users_phone_idx
"""


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
