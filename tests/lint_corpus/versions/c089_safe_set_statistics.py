"""safe: SET STATISTICS (SHARE UPDATE EXCLUSIVE, no rewrite)

Lint corpus entry c089 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c089"
down_revision = 'c088'
transactional = True
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
ALTER TABLE public.users ALTER COLUMN email SET STATISTICS 500
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
