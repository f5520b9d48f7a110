"""dangerous: DROP DATABASE

Lint corpus entry c039 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c039"
down_revision = 'c038'
transactional = False
EXPECT = "dangerous"
EXPECT_RULES = ('drop-database',)
SQL = """
DROP DATABASE IF EXISTS old_reports
"""


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
