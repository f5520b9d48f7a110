"""safe: SET LOCAL lock_timeout before a brief ALTER

Lint corpus entry c084 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c084"
down_revision = 'c083'
transactional = True
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
SET LOCAL lock_timeout = '2s';
ALTER TABLE public.users ADD COLUMN referrer text
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
