"""safe: DROP DEFAULT

Lint corpus entry c076 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c076"
down_revision = 'c075'
transactional = True
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
ALTER TABLE public.users ALTER COLUMN status DROP DEFAULT
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
