"""safe: CREATE SCHEMA

Lint corpus entry c087 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c087"
down_revision = 'c086'
transactional = True
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
CREATE SCHEMA IF NOT EXISTS reporting
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
