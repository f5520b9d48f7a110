"""dangerous: ALTER DOMAIN ADD CONSTRAINT

Lint corpus entry c048 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c048"
down_revision = 'c047'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('domain-constraint',)
SQL = """
ALTER DOMAIN public.positive_amount ADD CONSTRAINT positive_amount_check CHECK (VALUE >= 0)
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
