"""dangerous: int to bigint (rewrite)

Lint corpus entry c029 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c029"
down_revision = 'c028'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('column-type-change',)
SQL = """
ALTER TABLE public.orders ALTER COLUMN quantity TYPE bigint
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
