"""dangerous: serial column on an existing table

Lint corpus entry c004 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c004"
down_revision = 'c003'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('add-column-rewrite', 'prefer-identity')
SQL = """
ALTER TABLE public.orders ADD COLUMN line_no bigserial
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
