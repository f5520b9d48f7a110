"""orders.tax_amount, nullable (expand)

Revision ID: 0005
Revises: 0004
Create Date: 2025-07-01

Zero-downtime example 3, step 1 of 3. Adding the column NOT NULL at once would fail on
existing rows (or, with a default, bake in a made-up value). Instead: add it nullable
(catalog-only, instant), backfill in batches (0006), then enforce NOT NULL through a
NOT VALID check that is validated later (0007, 0008).
"""
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None
transactional = True


def upgrade() -> None:
    op.execute("ALTER TABLE public.orders ADD COLUMN tax_amount numeric(12,2)")


def downgrade() -> None:
    op.execute("ALTER TABLE public.orders DROP COLUMN tax_amount")
