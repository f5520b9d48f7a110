"""Split users.full_name into first_name and last_name; names without a first name are reported, not guessed."""
import pandas as pd

TABLE = "users"
WHERE = "first_name IS NULL AND last_name IS NULL"  # rows that still need the split
VALID = "btrim(full_name) LIKE '% %'"  # "Smith" or "" has no first name: skipped and reported
COLUMNS = ["full_name", "first_name", "last_name"]  # what change() reads and writes
SNAPSHOT = ["first_name", "last_name", "updated_at"]  # updated_at: the users_set_updated_at trigger stamps it


def change(df: pd.DataFrame) -> pd.DataFrame:
    parts = df["full_name"].str.strip().str.split(n=1, expand=True).reindex(columns=[0, 1])
    return pd.DataFrame({"first_name": parts[0], "last_name": parts[1]}, index=df.index)
