"""dangerous: CREATE TRIGGER on an existing table

Lint corpus entry c045 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c045"
down_revision = 'c044'
transactional = True
EXPECT = "dangerous"
EXPECT_RULES = ('create-trigger',)
SQL = """
CREATE TRIGGER orders_touch BEFORE UPDATE ON public.orders FOR EACH ROW EXECUTE FUNCTION public.touch()
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
