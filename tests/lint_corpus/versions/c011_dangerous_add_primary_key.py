"""dangerous: ADD PRIMARY KEY without USING INDEX

Lint corpus entry c011 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c011"
down_revision = 'c010'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('constraint-without-using-index', 'unique-index-existing-data')
SQL = """
ALTER TABLE public.audit ADD PRIMARY KEY (id)
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
