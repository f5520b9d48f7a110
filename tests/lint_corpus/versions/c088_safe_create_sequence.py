"""safe: CREATE SEQUENCE

Lint corpus entry c088 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c088"
down_revision = 'c087'
transactional = True
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
CREATE SEQUENCE IF NOT EXISTS public.invoice_no_seq AS bigint
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
