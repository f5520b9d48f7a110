"""safe: SET NOT NULL once a CHECK (col IS NOT NULL) is validated

Lint corpus entry c071 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c071"
down_revision = 'c070'
transactional = True
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
ALTER TABLE public.users VALIDATE CONSTRAINT users_name_not_null;
ALTER TABLE public.users ALTER COLUMN name SET NOT NULL
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
