"""dangerous: char(n)

Lint corpus entry c056 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c056"
down_revision = 'c055'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('char-field',)
SQL = """
ALTER TABLE public.users ADD COLUMN country char(2)
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
