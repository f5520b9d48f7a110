"""validate the check, then make orders.tax_amount NOT NULL

Revision ID: 0008
Revises: 0007
Create Date: 2025-07-01

Zero-downtime example 3, step 3b. VALIDATE CONSTRAINT scans orders under SHARE UPDATE
EXCLUSIVE, which lets reads and writes go on. With a valid `IS NOT NULL` check in place,
SET NOT NULL skips its own full scan (PostgreSQL 12+), so its ACCESS EXCLUSIVE lock is
brief; the check is then redundant and dropped.
"""
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None
transactional = True


def upgrade() -> None:
    op.execute("ALTER TABLE public.orders VALIDATE CONSTRAINT orders_tax_amount_not_null")
    op.execute("ALTER TABLE public.orders ALTER COLUMN tax_amount SET NOT NULL")
    op.execute("ALTER TABLE public.orders DROP CONSTRAINT orders_tax_amount_not_null")


def downgrade() -> None:
    # Back to exactly what 0007 left: the column nullable, the check present but NOT VALID.
    op.execute("ALTER TABLE public.orders ALTER COLUMN tax_amount DROP NOT NULL")
    op.execute("""
ALTER TABLE public.orders
    ADD CONSTRAINT orders_tax_amount_not_null CHECK (tax_amount IS NOT NULL) NOT VALID
""")
