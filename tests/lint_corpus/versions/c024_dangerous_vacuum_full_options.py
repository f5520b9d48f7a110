"""dangerous: VACUUM (FULL, ANALYZE)

Lint corpus entry c024 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c024"
down_revision = 'c023'
transactional = False
EXPECT = "dangerous"
EXPECT_RULES = ('vacuum-full',)
SQL = """
VACUUM (FULL, ANALYZE) public.users
"""


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
