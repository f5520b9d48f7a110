"""dangerous: ADD EXCLUDE (builds an index under ACCESS EXCLUSIVE)

Lint corpus entry c013 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c013"
down_revision = 'c012'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('constraint-without-using-index',)
SQL = """
ALTER TABLE public.audit ADD CONSTRAINT audit_no_dup EXCLUDE USING btree (id WITH =)
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
