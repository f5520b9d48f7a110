"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""
# Rules of this project (checked by `dataops migrate ENV lint`):
# - write both upgrade() and downgrade(); the rollback flow relies on downgrade().
# - transactional = True: the revision runs in one transaction with lock_timeout and
#   statement_timeout from dataops.yaml. Set it to False only for statements that cannot run in
#   a transaction (CREATE INDEX CONCURRENTLY, batched backfills), put them in
#   `with op.get_context().autocommit_block():`, and make the revision safe to re-run.
# - a finding you have checked can be allowed with a comment line such as
#   `# dataops: allow=drop-column` (the rule names are in tasks/migration_lint.py).
from alembic import op
${imports if imports else ""}
revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}
transactional = True


def upgrade() -> None:
    ${upgrades if upgrades else 'raise NotImplementedError("write upgrade() with op.execute(...)")'}


def downgrade() -> None:
    ${downgrades if downgrades else 'raise NotImplementedError("write the downgrade: it undoes upgrade() exactly")'}
