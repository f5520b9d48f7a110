"""dangerous: DROP INDEX without CONCURRENTLY

Lint corpus entry c015 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c015"
down_revision = 'c014'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('drop-index-not-concurrent',)
SQL = """
DROP INDEX public.users_phone_idx
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
