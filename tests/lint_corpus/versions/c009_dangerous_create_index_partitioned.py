"""dangerous: CREATE INDEX on a partitioned table

Lint corpus entry c009 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c009"
down_revision = 'c008'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('index-not-concurrent',)
SQL = """
CREATE INDEX events_kind_idx ON public.events (kind)
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
