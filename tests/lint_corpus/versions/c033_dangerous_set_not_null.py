"""dangerous: SET NOT NULL without a validated CHECK

Lint corpus entry c033 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c033"
down_revision = 'c032'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('set-not-null-scan',)
SQL = """
ALTER TABLE public.users ALTER COLUMN phone SET NOT NULL
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
