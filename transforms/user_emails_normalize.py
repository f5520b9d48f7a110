"""Normalize user_emails.email to lower case without spaces, then drop each user's duplicates (the smallest id stays)."""

# the same address (once normalized) is already stored for this user under a smaller id
_DUPLICATE = """EXISTS (SELECT 1 FROM user_emails AS o WHERE o.user_id = user_emails.user_id
                AND lower(btrim(o.email)) = lower(btrim(user_emails.email)) AND o.id < user_emails.id)"""

TABLE = "user_emails"
WHERE = f"email <> lower(btrim(email)) OR {_DUPLICATE}"
SET = {"email": "lower(btrim(email))"}
DELETE = _DUPLICATE
SNAPSHOT = "*"  # whole rows, so that revert can put the removed duplicates back
