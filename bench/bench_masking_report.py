"""What `dataops anonymize ENV --report` costs: anonymize in place without (A) and with (B) the
masking report's counts, interleaved A/B B/A on copies of one seeded database (VACUUM FULL left
out: the counts run inside the transaction, before it).

    .venv/bin/python bench/bench_masking_report.py [USERS]    (default 100000)

Prints one JSON line with each run's seconds, the medians and os.getloadavg().
"""
import json
import os
import sys
import tempfile
import time
import uuid

_rt = os.path.join(tempfile.gettempdir(), f"dataops-runtime-{os.getuid()}")
os.makedirs(_rt, mode=0o700, exist_ok=True)
os.environ.setdefault("XDG_RUNTIME_DIR", _rt)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import statistics  # noqa: E402

import pgserver  # noqa: E402
from test_refresh_staging import ANON  # noqa: E402

from dataops.dev.sample_app import create_schema, seed  # noqa: E402
from dataops.dsn import Dsn  # noqa: E402
from dataops.settings import parse_settings  # noqa: E402
from dataops.tasks import pg  # noqa: E402
from dataops.tasks.anonymize.in_place import anonymize  # noqa: E402


def main() -> None:
    USERS = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    srv = pgserver.get_server(tempfile.mkdtemp(prefix="s21b-"), cleanup_mode="delete")
    base = Dsn(srv.get_uri("postgres"))
    tmpl = f"tmpl_{uuid.uuid4().hex[:6]}"
    pg.create_database(base, tmpl)
    create_schema(base.with_database(tmpl)); seed(base.with_database(tmpl), users=USERS)
    results = {"A (no report)": [], "B (--report counts)": []}
    for i in range(3):
        for label, count in (("A (no report)", False), ("B (--report counts)", True)) if i % 2 == 0 else (("B (--report counts)", True), ("A (no report)", False)):
            name = f"c_{uuid.uuid4().hex[:6]}"
            with pg.connect(base, autocommit=True) as c:
                c.execute(f'CREATE DATABASE "{name}" TEMPLATE "{tmpl}"')
            s = parse_settings({"environments": {"dev": {"role": "staging", "database_url": base.with_database(name).secret()}},
                                "storage": {"url": "file:///tmp/unused"}, "anonymize": ANON})
            t0 = time.monotonic()
            anonymize(s, s.env("dev"), vacuum=False, count=count)
            results[label].append(time.monotonic() - t0)
            with pg.connect(base, autocommit=True) as c:
                c.execute(f'DROP DATABASE "{name}"')
    print(json.dumps({"users": USERS, "loadavg": os.getloadavg(),
                      **{k: {"runs": [round(x, 2) for x in v], "median": round(statistics.median(v), 2)} for k, v in results.items()}}))
    srv.cleanup()


if __name__ == "__main__":
    main()
