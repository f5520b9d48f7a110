"""dangerous: int (serial) primary key

Lint corpus entry c052 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c052"
down_revision = 'c051'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('prefer-bigint-key', 'prefer-identity')
SQL = """
CREATE TABLE public.tags (id serial PRIMARY KEY, name text NOT NULL)
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
