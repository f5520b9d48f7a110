"""safe: DROP COLUMN after expand/contract, allowed in both tools

Lint corpus entry c090 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

# dataops: allow=drop-column

revision = "c090"
down_revision = 'c089'
transactional = True
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
-- squawk-ignore ban-drop-column
ALTER TABLE public.users DROP COLUMN legacy
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
