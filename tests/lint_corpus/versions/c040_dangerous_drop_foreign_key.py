"""dangerous: dropping a foreign key

Lint corpus entry c040 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c040"
down_revision = 'c039'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('drop-foreign-key',)
SQL = """
ALTER TABLE public.orders DROP CONSTRAINT orders_user_id_fkey
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
