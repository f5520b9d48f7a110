"""safe: INSERT of reference rows

Lint corpus entry c083 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c083"
down_revision = 'c082'
transactional = True
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
INSERT INTO public.products (name) VALUES ('gift card')
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
