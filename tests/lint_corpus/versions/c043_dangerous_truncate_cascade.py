"""dangerous: TRUNCATE ... CASCADE

Lint corpus entry c043 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c043"
down_revision = 'c042'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('truncate-cascade',)
SQL = """
TRUNCATE public.users CASCADE
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
