"""dangerous: timestamp without time zone

Lint corpus entry c055 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c055"
down_revision = 'c054'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('timestamp-without-time-zone',)
SQL = """
ALTER TABLE public.users ADD COLUMN seen_at timestamp
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
