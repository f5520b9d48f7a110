"""dangerous: DROP NOT NULL

Lint corpus entry c035 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c035"
down_revision = 'c034'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('drop-not-null',)
SQL = """
ALTER TABLE public.users ALTER COLUMN legacy DROP NOT NULL
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
