"""dangerous: a 70-byte index name

Lint corpus entry c047 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c047"
down_revision = 'c046'
transactional = False
EXPECT = "dangerous"
EXPECT_RULES = ('identifier-too-long',)
SQL = """
CREATE INDEX CONCURRENTLY users_created_at_for_the_monthly_cohort_report_of_the_growth_team_idx ON public.users (created_at)
"""


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
