"""The CI pipelines users copy (infra/ci/) run as written: their steps, taken from the files, are
executed in order against real PostgreSQL, S3 and a Prefect server, as the CI runner would.

Green path: the pull-request job (lint, plan, test) and the merge job (status, validate, backup, up,
verify) pass and staging ends at head. Failing path: a revision that fails when it runs fails the
job with the command's exit code, and staging's schema and data are what they were before the job.
Only the install steps are left out (the runner installs dataops; here it is installed already).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from test_crash_matrix import content
from test_migrate_flows import FAILS_HALFWAY
from test_migrations_examples import REPO_MIGRATIONS, migrations_copy

from dataops.dev.sample_app import create_schema, seed
from dataops.tasks.migration.migrate import MigrationTarget, read_current, stamp

CI = Path(__file__).resolve().parents[1] / "infra" / "ci"
HEAD = "0008"


@dataclass
class Step:
    name: str
    script: str


def github_steps(job: str) -> list[Step]:
    jobs = yaml.safe_load((CI / "github-actions.yml").read_text())["jobs"]
    return [Step(s.get("name", s["run"]), s["run"]) for s in jobs[job]["steps"]
            if "run" in s and s.get("name") != "install dataops"]


def gitlab_steps(job: str) -> list[Step]:
    jobs = yaml.safe_load((CI / "gitlab-ci.yml").read_text())
    return [Step(line, line) for line in jobs[job]["script"]]


PIPELINES = {
    "github": {"check": lambda: github_steps("check"), "merge": lambda: github_steps("staging")},
    "gitlab": {"check": lambda: gitlab_steps("migrations:check"), "merge": lambda: gitlab_steps("migrations:staging")},
}


def run_job(steps: list[Step], env: dict[str, str], cwd: Path) -> tuple[int, list[str]]:
    """Run the steps as the runner does: each in `bash -eo pipefail`, stopping at the first that fails.
    Returns the job's exit code and the names of the steps that ran."""
    ran = []
    for step in steps:
        ran.append(step.name)
        r = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step.script], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=300)
        if r.returncode:
            sys.stderr.write(r.stderr[-3000:])
            return r.returncode, ran
    return 0, ran


def public_schema(dsn) -> str:
    from pgserver._commands import POSTGRES_BIN_PATH

    conninfo, secret_env = dsn.libpq_args()
    out = subprocess.run([str(Path(POSTGRES_BIN_PATH) / "pg_dump"), "--schema-only", "--schema=public", "--no-owner",
                          f"--dbname={conninfo}"], capture_output=True, text=True, env={**os.environ, **secret_env},
                         check=True).stdout
    return "\n".join(line for line in out.splitlines() if not line.startswith(("--", "\\restrict", "\\unrestrict")))


@pytest.fixture
def staging(make_db, s3_bucket, write_config, tmp_path, prefect_api):
    """A repository checkout as the runner sees it: dataops.yaml and migrations/ at its root, staging
    (seeded, at 0002) reachable, runs going to the Prefect server."""
    def make(**extra_revisions: str) -> tuple[object, dict[str, str], Path]:
        dsn = make_db("staging")
        create_schema(dsn)
        seed(dsn, users=120, seed=7)
        stamp(MigrationTarget(dsn, REPO_MIGRATIONS), "0002")
        checkout = tmp_path / "checkout"
        checkout.mkdir()
        migrations_copy(checkout, **extra_revisions)
        write_config({"staging": ("staging", dsn)}, bucket=s3_bucket, name="checkout/dataops.yaml",
                     extra={"migrations": {"path": "migrations", "lock_timeout": "2s"}})
        env = {**os.environ, "DATAOPS_CONFIG": "dataops.yaml", "PREFECT_API_URL": prefect_api,
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        return dsn, env, checkout

    return make


# make test-crash runs them (CI runs it after make test): about a minute per file
BOTH = ["github", "gitlab"]
pytestmark = pytest.mark.extended


@pytest.mark.parametrize("ci", BOTH)
def test_the_pipeline_passes_and_staging_reaches_head(ci, staging):
    dsn, env, checkout = staging()
    jobs = PIPELINES[ci]

    rc, ran = run_job(jobs["check"](), env, checkout)
    assert rc == 0 and len(ran) == 3, ran
    assert read_current(dsn) == "0002"  # the pull-request job changes nothing

    rc, ran = run_job(jobs["merge"](), env, checkout)
    assert rc == 0, ran
    assert read_current(dsn) == HEAD


@pytest.mark.parametrize("ci", BOTH)
def test_a_failing_revision_fails_the_job_and_leaves_staging_as_it_was(ci, staging):
    dsn, env, checkout = staging(**{"0009_fails_halfway": FAILS_HALFWAY})
    before = (content(dsn), public_schema(dsn))
    jobs = PIPELINES[ci]

    rc, ran = run_job(jobs["check"](), env, checkout)
    assert rc == 1 and ran[-1].endswith("test"), ran  # the round trip on a scratch database finds it
    assert (content(dsn), public_schema(dsn)) == before and read_current(dsn) == "0002"

    rc, ran = run_job(jobs["merge"](), env, checkout)
    assert rc == 1 and "up" in ran[-1], ran  # status, validate and backup passed; up failed and rolled back
    assert (content(dsn), public_schema(dsn)) == before and read_current(dsn) == "0002"
