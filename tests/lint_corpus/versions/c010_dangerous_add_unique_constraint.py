"""dangerous: ADD UNIQUE without USING INDEX

Lint corpus entry c010 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c010"
down_revision = 'c009'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('constraint-without-using-index', 'unique-index-existing-data')
SQL = """
ALTER TABLE public.users ADD CONSTRAINT users_phone_key UNIQUE (phone)
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
