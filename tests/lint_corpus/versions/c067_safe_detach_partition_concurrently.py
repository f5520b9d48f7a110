"""safe: DETACH PARTITION CONCURRENTLY outside a transaction

Lint corpus entry c067 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c067"
down_revision = 'c066'
transactional = False
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
ALTER TABLE public.events DETACH PARTITION public.events_2024 CONCURRENTLY
"""


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
