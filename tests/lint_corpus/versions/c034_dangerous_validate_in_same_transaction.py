"""dangerous: VALIDATE in the transaction that added the constraint

Lint corpus entry c034 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c034"
down_revision = 'c033'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('validate-in-same-transaction',)
SQL = """
ALTER TABLE public.users ADD CONSTRAINT users_email_at CHECK (position('@' in email) > 0) NOT VALID;
ALTER TABLE public.users VALIDATE CONSTRAINT users_email_at
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
