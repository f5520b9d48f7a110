"""dangerous: ADD COLUMN serial PRIMARY KEY

Lint corpus entry c012 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c012"
down_revision = 'c011'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('add-column-rewrite', 'constraint-without-using-index', 'prefer-bigint-key', 'prefer-identity')
SQL = """
ALTER TABLE public.scratch_log ADD COLUMN log_id serial PRIMARY KEY
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
