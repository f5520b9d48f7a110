"""safe: CREATE VIEW

Lint corpus entry c079 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c079"
down_revision = 'c078'
transactional = True
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
CREATE VIEW public.user_contacts AS SELECT id, email, phone FROM public.users
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
