"""dangerous: DROP COLUMN

Lint corpus entry c036 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c036"
down_revision = 'c035'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('drop-column',)
SQL = """
ALTER TABLE public.users DROP COLUMN legacy
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
