"""Alembic environment for dataops.

dataops, not Alembic, owns the connection: tasks/migrate.py opens it, takes the advisory
lock on it, sets lock_timeout/statement_timeout and decides the transactions, then hands
it over in `config.attributes["connection"]`. A revision run inside a transaction that
dataops began runs in that transaction (Alembic sees an external one); otherwise each
revision gets its own (`transaction_per_migration`), which is what a revision marked
`transactional = False` needs for its `autocommit_block()`.

The version table lives in the tool's own schema, `dataops_migrations`, which schema
fingerprints and table lists leave out, so recording a revision never looks like a schema
change of the application.

Offline mode (`dataops migrate ENV plan`) renders the SQL without a connection.
"""

from alembic import context

VERSION_SCHEMA = "dataops_migrations"

config = context.config


def run_offline() -> None:
    context.configure(
        dialect_name="postgresql",
        literal_binds=True,
        version_table_schema=VERSION_SCHEMA,
        transaction_per_migration=True,
        output_buffer=config.output_buffer,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("dataops runs these migrations: use `dataops migrate ENV ...`, not the alembic command")
    context.configure(
        connection=connection,
        version_table_schema=VERSION_SCHEMA,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
