"""dangerous: DETACH PARTITION without CONCURRENTLY

Lint corpus entry c022 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c022"
down_revision = 'c021'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('detach-partition-not-concurrent',)
SQL = """
ALTER TABLE public.events DETACH PARTITION public.events_2024
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
