"""backfill orders.tax_amount in batches

Revision ID: 0006
Revises: 0005
Create Date: 2025-07-01

Zero-downtime example 3, step 2 of 3. One UPDATE of the whole table would hold row locks
on every order until it commits and bloat the table in one go. Batches of BATCH rows,
each committed on its own (autocommit block, so `transactional = False`), keep each lock
short; the loop resumes where it stopped if the revision is run again.
"""
from alembic import context, op
from sqlalchemy import text

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None
transactional = False

BATCH = 5000
TAX_RATE = "0.08"

FILL = f"""UPDATE public.orders SET tax_amount = round(amount * {TAX_RATE}, 2)
WHERE id IN (SELECT id FROM public.orders WHERE tax_amount IS NULL ORDER BY id LIMIT {BATCH})"""
CLEAR = f"""UPDATE public.orders SET tax_amount = NULL
WHERE id IN (SELECT id FROM public.orders WHERE tax_amount IS NOT NULL ORDER BY id LIMIT {BATCH})"""


def _in_batches(statement: str) -> None:
    with op.get_context().autocommit_block():
        if context.is_offline_mode():
            op.execute(f"-- repeated, one batch per transaction, until it updates no row\n{statement}")
            return
        bind = op.get_bind()
        while bind.execute(text(statement)).rowcount:
            pass


def upgrade() -> None:
    _in_batches(FILL)


def downgrade() -> None:
    _in_batches(CLEAR)
