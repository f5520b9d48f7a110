"""dangerous: column defaulting to clock_timestamp()

Lint corpus entry c003 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c003"
down_revision = 'c002'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('add-column-volatile-default',)
SQL = """
ALTER TABLE public.users ADD COLUMN touched_at timestamptz DEFAULT clock_timestamp()
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
