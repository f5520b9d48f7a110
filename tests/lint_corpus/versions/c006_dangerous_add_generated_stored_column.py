"""dangerous: stored generated column

Lint corpus entry c006 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c006"
down_revision = 'c005'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('add-column-rewrite',)
SQL = """
ALTER TABLE public.users ADD COLUMN email_lower text GENERATED ALWAYS AS (lower(email)) STORED
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
