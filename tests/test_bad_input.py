"""Bad input to every command: one line that says what to fix, exit 2, and nothing written.

"Nothing written" is checked, not assumed: every environment's rows and schema are hashed by this
file's own queries before and after, and the storage folder's objects are listed before and after.
Every case runs against real databases that the same command, given good input, would change.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli
from test_crash_matrix import content, schema
from test_refresh_staging import ANON

from dataops.dev.sample_app import create_schema, seed

REPO = Path(__file__).resolve().parent.parent

CASES = [
    # (label, argv after --config, what the one line must say)
    ("migrate: unknown environment", ["migrate", "prod", "up"], "unknown environment 'prod'"),
    ("migrate: unknown revision", ["migrate", "staging", "up", "--to", "9999"], "9999"),
    ("migrate: down from production without confirm", ["migrate", "production", "down", "--steps", "1"],
     "production"),
    ("transform: unknown transform", ["transform", "staging", "run", "no_such_transform"], "no_such_transform"),
    ("transform: workers out of bounds", ["transform", "staging", "run", "users_split_full_name", "--workers", "65"],
     "workers"),
    ("transform: unknown environment", ["transform", "stagin", "run", "users_split_full_name"],
     "unknown environment 'stagin'"),
    ("refresh-staging: production as the target", ["refresh-staging", "--target", "production"],
     "refresh target 'production' has role production"),
    ("refresh-staging: unknown source", ["refresh-staging", "--source", "nope"], "nope"),
    ("validate: against itself", ["validate", "staging", "--against", "staging"], "another environment"),
    ("validate: unknown other", ["validate", "staging", "--against", "nope"], "unknown environment 'nope'"),
    ("anonymize: a production environment", ["anonymize", "production"], "production"),
    ("anonymize: unknown environment", ["anonymize", "nope"], "unknown environment 'nope'"),
    ("restore: into production without confirm", ["restore", "staging", "latest", "--into", "production"],
     "has role production"),
    ("backup: unknown environment", ["backup", "nope"], "unknown environment 'nope'"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, pg_server_dsn):
    """production and staging with the sample app at 0002, a storage folder, and a config with
    migrations, transforms and masking rules: good input would write to all of them."""
    import uuid

    import yaml

    from dataops.tasks import pg

    dbs = {}
    for name, users in (("production", 60), ("staging", 30)):
        db = f"bad_{name}_{uuid.uuid4().hex[:8]}"
        pg.create_database(pg_server_dsn, db)
        dsn = pg_server_dsn.with_database(db)
        create_schema(dsn)
        seed(dsn, users=users)
        dbs[name] = dsn
    root = tmp_path_factory.mktemp("bad-input")
    store = root / "store"
    store.mkdir()
    (store / "keep.txt").write_text("an object that must stay")
    cfg = root / "dataops.yaml"
    cfg.write_text(yaml.safe_dump({
        "environments": {n: {"role": n, "database_url": d.secret()} for n, d in dbs.items()},
        "storage": {"url": f"file://{store}"},
        "migrations": {"path": str(REPO / "migrations")},
        "transforms": {"path": str(REPO / "transforms")},
        "anonymize": ANON,
    }))
    yield {"cfg": cfg, "dbs": dbs, "store": store}
    for d in dbs.values():
        pg.drop_database(pg_server_dsn, d.database)


def snapshot(w) -> tuple:
    objects = sorted((p.relative_to(w["store"]).as_posix(), p.stat().st_size) for p in w["store"].rglob("*")
                     if p.is_file())
    return tuple((content(d), schema(d)) for d in w["dbs"].values()) + (tuple(objects),)


@pytest.mark.parametrize("label,argv,says", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(world, label, argv, says):
    before = snapshot(world)
    r = run_cli("--config", str(world["cfg"]), *argv)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], r.stderr
    assert snapshot(world) == before


def test_the_world_is_writable(world, prefect_api):
    """The control: the same config, with good input, does write (a backup lands in the folder)."""
    before = snapshot(world)
    r = run_cli("--config", str(world["cfg"]), "backup", "staging", env={"PREFECT_API_URL": prefect_api})
    assert r.returncode == 0, r.stderr
    assert snapshot(world)[-1] != before[-1]
