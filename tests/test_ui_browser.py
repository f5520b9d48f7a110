"""The Prefect UI in a real browser (Debian's chromium driven by playwright), as a person uses it:
the deployments page lists every deployment with its schedule; a person starts
production-migration from its Run page with parameters, approves it in the Resume dialog,
and the run completes. Every request that is not to 127.0.0.1 is blocked (the new UI tries
to reach an outside analytics host); the test asserts that none got through.

A screenshot of each step is saved in a folder the test prints (under pytest's tmp dir, and
also in $DATAOPS_UI_SCREENSHOTS when set). On a failure the page's screenshot and HTML are
saved there as failure.png / failure.html.

Shares the `deployed` stack with test_deploy_runs.py (which may already have migrated
production): the target is the revision after production's current one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
LOCAL_HOST = "127.0.0.1"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run",
               f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {LOCAL_HOST}"]
UI_TIMEOUT_MS = 60_000          # a page or element to appear (2 shared cores: generous)
PAUSE_TIMEOUT_S = 180           # preflight + backup before the approval pause (~10 s as a rule)
FINISH_TIMEOUT_S = 180          # apply + validation after the approval (~5 s as a rule)
SCHEDULED = ("nightly-staging-refresh", "nightly-production-backup", "daily-production-validation")
APPROVER = "Ada Lovelace (browser test)"
COMMENT = "plan reviewed in the Resume dialog"
# No Vue transition running: its classes are on elements only while they fade in or out.
SETTLED_JS = "() => !document.querySelector('[class*=\"-enter-active\"], [class*=\"-leave-active\"]')"


def _need(what: str, hint: str) -> None:
    """Missing browser tooling fails the test, never skips it: `make test` installs it, and a
    skip would let a broken install pass as green."""
    pytest.fail(f"{what} is missing: {hint}")


def cron_text(cron: str) -> str:
    """How the UI (cronstrue) describes a daily cron 'M H * * *': 'At 02:00 AM every day'."""
    minute, hour, *rest = cron.split()
    assert rest == ["*", "*", "*"] and minute.isdigit() and hour.isdigit(), f"not a daily cron: {cron}"
    h = int(hour)
    return f"At {h % 12 or 12:02d}:{int(minute):02d} {'AM' if h < 12 else 'PM'} every day"


def next_revision(current: str | None) -> str:
    revisions = sorted(p.name.split("_", 1)[0] for p in (REPO / "migrations" / "versions").glob("[0-9]*_*.py"))
    later = [r for r in revisions if current is None or r > current]
    assert later, f"production is already at the last revision ({current}); nothing left to migrate in the UI"
    return later[0]


def production_revision(dsn) -> str | None:
    from dataops.tasks import pg

    with pg.connect(dsn) as conn:
        row = conn.execute("SELECT version_num FROM dataops_migrations.alembic_version").fetchone()
    return row[0] if row else None


def audit_row(dsn, run_id: str) -> dict | None:
    from psycopg.rows import dict_row

    from dataops.tasks import pg

    with pg.connect(dsn) as conn:
        return conn.cursor(row_factory=dict_row).execute(
            "SELECT approver, comment, outcome, applied, to_revision FROM dataops_migrations.audit WHERE run_id = %s",
            (run_id,)).fetchone()


def wait_for_run(client, run_id, done, timeout: float, what: str):
    """Poll the API until done(run) or the run is final; returns the run."""
    deadline = time.monotonic() + timeout
    while True:
        run = client.read_flow_run(run_id)
        if run.state and (done(run) or run.state.is_final()):
            return run
        if time.monotonic() > deadline:
            pytest.fail(f"run {run_id} not {what} within {timeout:.0f} s: state {run.state and run.state.name}")
        time.sleep(0.5)


class Shots:
    """One screenshot per step, in pytest's tmp dir and in $DATAOPS_UI_SCREENSHOTS if set."""

    def __init__(self, folder: Path):
        self.folders = [folder]
        extra = os.environ.get("DATAOPS_UI_SCREENSHOTS")
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            self.folders.append(Path(extra))
        self.saved: list[Path] = []

    def take(self, page, name: str) -> Path:
        path = self.folders[0] / f"{len(self.saved) + 1:02d}-{name}.png"
        try:  # not mid-way through a fade (the UI's route and toast transitions)
            page.wait_for_function(SETTLED_JS, timeout=10_000)
        except Exception as exc:  # noqa: BLE001 - a picture of a page that keeps moving is still a picture
            print(f"{path.name}: taken while the page still moves ({type(exc).__name__})")
        page.screenshot(path=str(path))
        for other in self.folders[1:]:
            shutil.copy2(path, other / path.name)
        self.saved.append(path)
        return path

    def failure(self, page) -> None:
        for folder in self.folders:
            try:
                page.screenshot(path=str(folder / "failure.png"), full_page=True)
                (folder / "failure.html").write_text(page.content())
            except Exception as exc:  # noqa: BLE001 - keep the test's own error
                print(f"could not save the failed page in {folder}: {exc}")


@pytest.fixture(scope="session")
def playwright_api():
    """playwright's sync API, once chromium is known to be there (checked before the stack starts)."""
    if not Path(CHROMIUM).exists():
        _need(CHROMIUM, "apt-get install -y chromium")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        _need("python playwright", "pip install playwright (Debian's chromium is used, no `playwright install`)")
    return sync_playwright, expect


@pytest.mark.timeout(600)  # ~30 s as a rule; the waits below are generous for a busy 2-core machine
@pytest.mark.extended  # make test-crash (CI runs it after make test): keeps make test under 15 minutes
def test_deployments_listed_and_migration_started_and_approved_in_the_ui(playwright_api, deployed, tmp_path_factory):
    sync_playwright, expect = playwright_api
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from dataops.settings import load_settings

    server, stack = deployed["server"], deployed["stack"]
    ui, api = server["ui"], server["url"]
    ui_settings = json.loads(urllib.request.urlopen(f"{ui}/ui-settings", timeout=10).read())
    assert ui_settings["api_url"] == api, (
        f"the UI would call {ui_settings['api_url']}, not this server's API {api}: start `prefect server start` "
        "with PREFECT_SERVER_UI_API_URL set to its API URL (prefect only derives it from PREFECT_SERVER_API_PORT)")
    settings = load_settings(deployed["config"])
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    names = [d["name"] for d in spec["deployments"]]
    current = production_revision(stack.pg_dsn_production)
    target = next_revision(current)

    shots = Shots(tmp_path_factory.mktemp("ui-screenshots"))
    print(f"\nscreenshots: {' and '.join(str(f) for f in shots.folders)}")
    blocked: list[str] = []
    allowed: list[str] = []
    outside_done: list[str] = []
    sockets: list[str] = []
    http_errors: list[str] = []  # API calls the UI made that failed: printed when the test fails

    def guard(route):
        url = route.request.url
        if urlsplit(url).scheme in ("data", "blob") or urlsplit(url).hostname == LOCAL_HOST:
            allowed.append(url)
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    def answered(response):
        if response.status >= 400 and "/api/" in response.url:
            http_errors.append(f"{response.status} {response.request.method} {response.url}")

    def finished(request):
        if urlsplit(request.url).scheme not in ("data", "blob") and urlsplit(request.url).hostname != LOCAL_HOST:
            outside_done.append(request.url)

    def submit(button, done, what: str) -> None:
        """Click `button` and wait for `done`. Prefect's server on SQLite answers a write
        with 503 when another writer holds the database ("database is locked", upstream
        issue 18934; the suite's runs and automations write to it too); the UI then shows
        the error and a person submits again. At most three tries; every 503 is kept."""
        for _ in range(3):
            seen = len(http_errors)
            button.click()
            deadline = time.monotonic() + UI_TIMEOUT_MS / 1000
            while time.monotonic() < deadline and not done.is_visible():
                if any(e.startswith("503 ") for e in http_errors[seen:]):
                    break
                page.wait_for_timeout(200)
            else:
                done.wait_for(timeout=1000)  # shown, or Playwright's own timeout error
                return
        raise AssertionError(f"{what}: the server answered 503 three times: {http_errors}")

    started = time.monotonic()
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client, \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, locale="en-US", timezone_id="UTC")
        context.set_default_timeout(UI_TIMEOUT_MS)
        context.route("**/*", guard)
        context.on("requestfinished", finished)
        context.on("response", answered)
        page = context.new_page()
        page.on("websocket", lambda ws: sockets.append(ws.url))
        try:
            # 1. The deployments page: every deployment, the schedules of the nightly/daily ones.
            crons = {}
            for deployment in client.read_deployments():
                if deployment.name in SCHEDULED:
                    (schedule,) = deployment.schedules
                    assert schedule.schedule.timezone == settings.schedules.timezone, (deployment.name, schedule)
                    crons[deployment.name] = schedule.schedule.cron
            assert crons["nightly-staging-refresh"] == settings.schedules.staging_refresh_cron
            page.goto(f"{ui}/deployments")
            page.get_by_text(f"{len(names)} Deployments", exact=True).wait_for()
            listed: list[str] = []
            schedules_seen: dict[str, str] = {}
            pager = page.locator(".p-pager__context")
            number, first_of_previous = 1, ""
            while True:  # 10 a page, as a person pages through them
                expect(pager).to_contain_text(f"Page {number} of", timeout=UI_TIMEOUT_MS)
                links = page.locator("a.deployment-list__name")
                if number > 1:  # the rows of the new page, not the old one's
                    expect(links.first).not_to_have_attribute("title", first_of_previous, timeout=UI_TIMEOUT_MS)
                here = [a.get_attribute("title") for a in links.all()]
                first_of_previous = here[0]
                listed += here
                for name in set(here) & set(SCHEDULED):
                    row = page.get_by_role("row").filter(has=page.get_by_role("link", name=name, exact=True))
                    badge = row.get_by_text(cron_text(crons[name]), exact=True)
                    badge.wait_for()
                    schedules_seen[name] = badge.inner_text()
                shots.take(page, f"deployments-page-{number}")
                if pager.inner_text().strip().endswith(f"of {number}"):
                    break
                page.locator(".p-pager__buttons button").nth(2).click()  # first, previous, NEXT, last
                number += 1
            assert sorted(listed) == sorted(names), f"listed {listed}, deployments/prefect.yaml has {names}"
            assert schedules_seen == {n: cron_text(c) for n, c in crons.items()}

            # 2. production-migration's Run page: target revision, dry_run off, Submit.
            page.goto(f"{ui}/deployments")  # page 1 again (a search from page 2 shows "Page 2 of 1")
            page.get_by_placeholder("Search deployments").fill("production-migration")
            page.get_by_text("1 Deployment", exact=True).wait_for()  # the filtered list, not the old one
            page.get_by_role("link", name="production-migration", exact=True).click()
            page.get_by_text("Deployment ID", exact=True).wait_for()
            deployment_id = page.url.split("?")[0].rstrip("/").rsplit("/", 1)[1]
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_text("Custom run", exact=True).click()
            page.wait_for_url(lambda url: urlsplit(url).path.endswith(f"/deployment/{deployment_id}/run"))

            def field(scope, label: str):
                return scope.locator(".schema-form-property").filter(
                    has=page.locator(".schema-form-property__label", has_text=label))

            target_box = field(page, "target").locator("textarea")
            target_box.wait_for()
            assert field(page, "env").locator("textarea").input_value() == "production"
            target_box.fill(target)
            dry_run = field(page, "dry_run").get_by_role("switch")
            if dry_run.get_attribute("aria-checked") == "true":
                dry_run.click()
            assert dry_run.get_attribute("aria-checked") == "false"
            run_name = page.locator(".flow-run-name-input input").input_value()
            assert run_name, "the Run page proposes no run name"
            shots.take(page, "run-page-filled")
            # The old UI mounts its toast app twice: the last copy is the one on top.
            toast = page.locator(".p-toast-container__toast").filter(
                has_text=f"{run_name} scheduled to start").filter(visible=True).last
            submit(page.get_by_role("button", name="Submit", exact=True), toast, "starting the run")
            shots.take(page, "run-submitted")
            toast.get_by_text("View run").click()
            page.wait_for_url("**/runs/flow-run/*")
            run_id = page.url.split("?")[0].rstrip("/").rsplit("/", 1)[1]
            run = client.read_flow_run(run_id)
            assert (run.name, str(run.deployment_id)) == (run_name, deployment_id)
            assert run.parameters["env"] == "production" and run.parameters["target"] == target
            assert run.parameters["dry_run"] is False

            # 3. Paused for approval: the Resume dialog, approved with a name and a comment.
            run = wait_for_run(client, run_id, lambda r: r.state.is_paused(), PAUSE_TIMEOUT_S, "paused")
            assert run.state.is_paused(), f"{run.state.name}: {run.state.message}"
            response_key = run.state.state_details.run_input_keyset["response"]
            page.reload()
            page.locator(".state-badge").filter(has_text="Paused").first.wait_for()
            resume = page.get_by_role("button", name="Resume", exact=True)
            resume.wait_for()
            shots.take(page, "run-paused")
            resume.click()
            dialog = page.get_by_role("dialog").filter(has_text="Resume Flow Run")
            dialog.get_by_text(f"from {current or 'base'} to {target}").wait_for()
            approved = field(dialog, "Approved").get_by_role("switch")  # its checkbox is hidden: click the switch
            approved.click()
            assert approved.get_attribute("aria-checked") == "true"
            field(dialog, "Approver").locator("textarea").fill(APPROVER)
            field(dialog, "Comment").locator("textarea").fill(COMMENT)
            shots.take(page, "resume-dialog-filled")
            submit(dialog.get_by_role("button", name="Submit", exact=True),
                   page.locator(".p-toast-container__toast").filter(has_text="Flow run resumed").filter(
                       visible=True).last, "resuming the run")
            dialog.wait_for(state="hidden")
            shots.take(page, "run-resumed")

            # 4. The run completes; production is at the target; the answer is on record.
            run = wait_for_run(client, run_id, lambda r: r.state.is_completed(), FINISH_TIMEOUT_S, "completed")
            assert run.state.is_completed(), f"{run.state.name}: {run.state.message}"
            page.reload()
            page.locator(".state-badge").filter(has_text="Completed").first.wait_for()
            page.locator(".p-tab").filter(has_text="Artifacts").click()  # the result artifact the flow publishes
            page.get_by_text("migration of production: succeeded", exact=True).first.wait_for()
            shots.take(page, "run-completed")
        except BaseException:
            shots.failure(page)
            print(f"failed API calls from the UI: {http_errors or 'none'}; page saved as failure.png/.html in "
                  f"{shots.folders[0]}")
            raise
        finally:
            browser.close()
        answer = json.loads(client.read_flow_run_input(run_id, response_key))
    print(f"UI walk-through took {time.monotonic() - started:.1f} s")

    assert production_revision(stack.pg_dsn_production) == target
    assert answer == {"approved": True, "approver": APPROVER, "comment": COMMENT}
    audit = audit_row(stack.pg_dsn_production, run_id)
    assert audit is not None, f"no audit row for run {run_id}"
    assert (audit["approver"], audit["comment"], audit["outcome"]) == (APPROVER, COMMENT, "succeeded")
    assert audit["applied"] == [target] and audit["to_revision"] == target

    for path in shots.saved:
        assert path.exists() and path.stat().st_size > 0, path
    steps = [f"deployments-page-{n}" for n in range(1, number + 1)] + [
        "run-page-filled", "run-submitted", "run-paused", "resume-dialog-filled", "run-resumed", "run-completed"]
    assert [p.name for p in shots.saved] == [f"{i:02d}-{step}.png" for i, step in enumerate(steps, 1)]
    # Only outside hosts were blocked, and nothing outside 127.0.0.1 was reached.
    assert len(allowed) > 10  # the guard saw the UI's own traffic, so what it did not block was local
    assert outside_done == [], outside_done
    assert all(urlsplit(u).hostname == LOCAL_HOST for u in sockets), sockets
    if blocked:
        print(f"blocked {len(blocked)} request(s) to outside hosts: "
              f"{sorted({urlsplit(u).hostname for u in blocked})}")
