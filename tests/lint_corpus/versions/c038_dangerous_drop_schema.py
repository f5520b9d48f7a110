"""dangerous: DROP SCHEMA

Lint corpus entry c038 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c038"
down_revision = 'c037'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('drop-schema',)
SQL = """
DROP SCHEMA archive CASCADE
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
