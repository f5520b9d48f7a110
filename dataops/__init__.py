"""dataops: safe backups, migrations, transforms, validation and staging refreshes for PostgreSQL."""

__version__ = "0.1.0"
