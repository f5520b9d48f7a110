"""dangerous: identity column on an existing table

Lint corpus entry c005 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c005"
down_revision = 'c004'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('add-column-rewrite',)
SQL = """
ALTER TABLE public.orders ADD COLUMN ref bigint GENERATED ALWAYS AS IDENTITY
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
