"""dangerous: COMMIT inside the revision's transaction

Lint corpus entry c050 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c050"
down_revision = 'c049'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('transaction-control',)
SQL = """
ALTER TABLE public.users ADD COLUMN nick3 text;
COMMIT
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
