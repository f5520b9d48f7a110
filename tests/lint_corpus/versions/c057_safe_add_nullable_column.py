"""safe: nullable column

Lint corpus entry c057 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c057"
down_revision = 'c056'
transactional = True
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
ALTER TABLE public.users ADD COLUMN nickname text
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
