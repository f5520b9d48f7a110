"""Backfill orders.tax_amount at 8% of amount: the expand step after migration 0005 adds the column."""

TABLE = "orders"
WHERE = "tax_amount IS NULL"
SET = {"tax_amount": "round(amount * 0.08, 2)"}
REVERT = {"tax_amount": "NULL"}  # undo by clearing what the backfill would have written...
REVERT_WHERE = "tax_amount = round(amount * 0.08, 2)"  # ...and keep amounts the application set otherwise
VERIFY = "SELECT id FROM orders WHERE tax_amount < 0 OR tax_amount > amount"  # must return no rows
