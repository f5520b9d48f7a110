"""safe: ADD PRIMARY KEY USING INDEX

Lint corpus entry c070 (tests/lint_corpus/README.md): linted by `dataops migrate ENV lint` and by
squawk (bench/bench_lint.py), never applied; the downgrade is a placeholder.
"""
from alembic import op

revision = "c070"
down_revision = 'c069'
transactional = True
EXPECT = "safe"
EXPECT_RULES = ()
SQL = """
ALTER TABLE public.audit ADD CONSTRAINT audit_pkey PRIMARY KEY USING INDEX audit_id_uidx
"""


def upgrade() -> None:
    op.execute(SQL)


def downgrade() -> None:
    op.execute("SELECT 1")
