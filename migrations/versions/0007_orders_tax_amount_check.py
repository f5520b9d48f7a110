"""orders.tax_amount IS NOT NULL, as a NOT VALID check

Revision ID: 0007
Revises: 0006
Create Date: 2025-07-01

Zero-downtime example 3, step 3a. `NOT VALID` makes adding the check instant: PostgreSQL
enforces it for new and updated rows at once but does not scan the existing ones (which
would hold ACCESS EXCLUSIVE on orders for the whole scan). 0008 validates it.
"""
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None
transactional = True


def upgrade() -> None:
    op.execute("""
ALTER TABLE public.orders
    ADD CONSTRAINT orders_tax_amount_not_null CHECK (tax_amount IS NOT NULL) NOT VALID
""")


def downgrade() -> None:
    op.execute("ALTER TABLE public.orders DROP CONSTRAINT orders_tax_amount_not_null")
