"""dangerous: smallint primary key

Lint corpus entry c054 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c054"
down_revision = 'c053'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('prefer-bigint-key',)
SQL = """
CREATE TABLE public.regions (id smallint PRIMARY KEY, name text NOT NULL)
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
