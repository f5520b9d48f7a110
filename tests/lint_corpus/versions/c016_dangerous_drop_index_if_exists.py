"""dangerous: DROP INDEX IF EXISTS without CONCURRENTLY

Lint corpus entry c016 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c016"
down_revision = 'c015'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('drop-index-not-concurrent',)
SQL = """
DROP INDEX IF EXISTS public.orders_note_idx
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
