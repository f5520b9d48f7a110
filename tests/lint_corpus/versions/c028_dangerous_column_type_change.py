"""dangerous: ALTER COLUMN TYPE (rewrite)

Lint corpus entry c028 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c028"
down_revision = 'c027'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('column-type-change',)
SQL = """
ALTER TABLE public.orders ALTER COLUMN note TYPE varchar(200)
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
