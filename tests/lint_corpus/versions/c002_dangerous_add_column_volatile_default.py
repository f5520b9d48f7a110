"""dangerous: column with a volatile default

Lint corpus entry c002 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c002"
down_revision = 'c001'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('add-column-volatile-default',)
SQL = """
ALTER TABLE public.users ADD COLUMN token uuid DEFAULT gen_random_uuid()
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
