"""`refresh-staging --check` proposes rules for the personal columns that have none, as YAML
to paste under anonymize.rules: parsed, pasted, the next check passes and a refresh with
them works, on real PostgreSQL. Never applied by itself: the check still refuses and
neither the config nor staging changes."""

from __future__ import annotations

import pytest
import yaml
from conftest import run_cli
from test_pii_guard import NORTHWIND
from test_refresh_staging import checksums, rows

from dataops.settings import load_settings
from dataops.tasks import pg
from dataops.tasks.refresh.plan import resolve_environments
from dataops.tasks.refresh.steps import check_refresh, refresh

SALT = "suggest-test-salt-0123456789"
# Kinds the guard finds, with the column shapes that bend the choice: unique, NOT NULL, narrow
# varchar and char, a domain with a CHECK, inet, numeric, a key referenced by another table.
ODD = """
CREATE DOMAIN us_zip AS varchar(10) CHECK (VALUE ~ '^[0-9]{5}$');
CREATE TABLE members (id int PRIMARY KEY, email varchar(40) NOT NULL UNIQUE, mobile_phone varchar(20) UNIQUE,
                      home_phone varchar(24), "FirstName" varchar(8), surname char(12), ssn char(11) UNIQUE,
                      birth_date varchar(10) NOT NULL, dob date, last_login_ip inet, password_hash text NOT NULL,
                      salary numeric(10, 2) NOT NULL, zip us_zip, bio text, plan text NOT NULL);
CREATE TABLE member_logins (id int PRIMARY KEY, member_email varchar(60) REFERENCES members (email),
                            user_agent text, at timestamptz NOT NULL);
INSERT INTO members SELECT g, 'member' || g || '@corp.example', '+1 555 01' || lpad(g::text, 4, '0'),
       '(206) 555-' || lpad(g::text, 4, '0'), left('Anne' || g, 8), 'Miller' || g, lpad(g::text, 3, '0') || '-12-3456',
       '1980-01-' || lpad((g % 28 + 1)::text, 2, '0'), date '1980-01-01' + g, ('192.168.0.' || g % 250)::inet,
       md5(g::text), 1000 + g, lpad((10000 + g)::text, 5, '0'), 'Anne likes ' || g, 'basic'
FROM generate_series(1, 120) g;
INSERT INTO member_logins SELECT g, 'member' || (g % 120 + 1) || '@corp.example', 'Mozilla/5.0 test ' || g, now()
FROM generate_series(1, 300) g;
"""
EXPECTED_ODD = {
    "members": {
        "email": {"faker": "email", "unique": True},
        "mobile_phone": {"hash": {"length": 16}},  # unique: a partial mask would collide
        "home_phone": {"partial": {"keep_last": 2}},
        "FirstName": {"faker": "first_name"},
        "surname": {"faker": "last_name"},
        "ssn": {"hash": {"length": 11}},
        "birth_date": {"hash": {"length": 10}},  # text, NOT NULL
        "dob": {"shift_days": 365},
        "last_login_ip": {"hash": {}},
        "password_hash": {"hash": {}},
        "salary": {"constant": "0.00"},  # as numeric(10, 2) prints it
        "zip": {"faker": "postcode"},
        "bio": None,
    },
    "member_logins": {"member_email": {"faker": "email", "unique": True}, "user_agent": {"faker": "user_agent"}},
}


@pytest.fixture
def source_and_staging(make_db, write_config):
    def make(script: str, rules: dict | None = None):
        prod, stg = make_db("prod"), make_db("stg")
        with pg.connect(prod) as conn:
            conn.execute(script)
            conn.commit()
        anon = {"salt": SALT, "pool_size": 500, "rules": rules or {}}
        cfg = write_config({"production": ("production", prod), "staging": ("staging", stg)}, bucket="unused",
                           extra={"anonymize": anon})
        return prod, stg, cfg

    return make


def paste(cfg, suggested: str):
    """What a user does: the printed YAML under anonymize.rules, added to the tables' rules."""
    body = yaml.safe_load(cfg.read_text())
    for table, cols in yaml.safe_load(suggested).items():
        body["anonymize"]["rules"].setdefault(table, {}).update(cols)
    cfg.write_text(yaml.safe_dump(body, sort_keys=False))


def test_rules_fit_the_columns_and_pasted_they_pass_and_refresh(source_and_staging):
    prod, stg, cfg = source_and_staging(ODD, rules={"members": {"plan": "keep"}})
    settings = load_settings(str(cfg))
    envs = resolve_environments(settings, None, None)
    text_before, stg_before = cfg.read_text(), checksums(stg)
    report = check_refresh(settings, *envs)
    assert len(report.unmasked_personal) == 15 and report.suggestion_check is None, report.suggestion_check
    assert yaml.safe_load(report.suggested) == EXPECTED_ODD
    assert "# character varying(8): name suggests person name" in report.suggested  # each rule says why, and the column
    assert "members:  # already in anonymize.rules: add these columns to it" in report.suggested
    assert cfg.read_text() == text_before and checksums(stg) == stg_before  # a suggestion, nothing applied

    paste(cfg, report.suggested)
    settings = load_settings(str(cfg))
    again = check_refresh(settings, *envs)
    assert again.unmasked_personal == [] and again.suggested == ""
    done = refresh(settings, *envs)
    assert done.leaks.ok and done.rows == 420
    # fitted: first names of at most 8 characters, every ZIP passes the domain's CHECK, keys still join
    assert rows(stg, 'SELECT max(length("FirstName")) FROM members')[0][0] <= 8
    assert rows(stg, "SELECT count(*) FILTER (WHERE zip !~ '^[0-9]{5}$'), count(DISTINCT email), "
                     "count(*) FILTER (WHERE email LIKE '%%corp.example') FROM members") == [(0, 120, 0)]
    assert rows(stg, "SELECT count(*) FROM member_logins l JOIN members m ON m.email = l.member_email") == [(300,)]
    assert rows(stg, "SELECT count(*) FROM members WHERE bio IS NOT NULL OR salary <> 0") == [(0,)]


def test_cli_check_prints_yaml_that_pasted_makes_the_refresh_work(prefect_api, source_and_staging):
    prod, stg, cfg = source_and_staging(NORTHWIND)
    env = {"PREFECT_API_URL": prefect_api}
    before = cfg.read_text()
    r = run_cli("--config", str(cfg), "refresh-staging", "--check", env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().startswith("error: 20 personal-looking column(s) have no masking rule")
    out = r.stdout
    start = out.index("Suggested rules")
    block = out[out.index("\n", start) + 1:out.index("\n\n", start)]
    suggested = yaml.safe_load(block)
    assert suggested["employees"]["first_name"] == {"faker": "first_name"}
    assert suggested["employees"]["birth_date"] == {"shift_days": 365}
    assert suggested["customers"]["phone"] == {"partial": {"keep_last": 2}}
    assert suggested["employees"]["notes"] is None and suggested["employees"]["photo"] is None
    assert cfg.read_text() == before

    paste(cfg, block)  # then the check passes and the refresh runs (the functions the CLI runs: seconds saved)
    settings = load_settings(str(cfg))
    envs = resolve_environments(settings, None, None)
    again = check_refresh(settings, *envs)
    assert again.unmasked_personal == [] and again.suggested == ""
    assert refresh(settings, *envs).leaks.ok
    (n, longest, kept), = rows(stg, "SELECT count(*), max(length(first_name)), "
                                  "count(*) FILTER (WHERE first_name LIKE 'Nancy%%') FROM employees")
    assert n == 30 and longest <= 10 and kept == 0
    assert rows(stg, "SELECT count(*) FROM employees WHERE notes IS NOT NULL OR photo IS NOT NULL") == [(0,)]


def test_an_unflagged_key_gets_the_rule_of_the_column_that_references_it(source_and_staging):
    """member_logins.member_email looks personal and references members.handle, which does
    not: masking one side alone would break the key, so the suggestion masks both alike."""
    script = """
    CREATE TABLE members (id int PRIMARY KEY, handle varchar(60) NOT NULL UNIQUE);
    CREATE TABLE member_logins (id int PRIMARY KEY, member_email varchar(60) REFERENCES members (handle));
    INSERT INTO members SELECT g, 'm-' || g FROM generate_series(1, 50) g;
    INSERT INTO member_logins SELECT g, 'm-' || (g % 50 + 1) FROM generate_series(1, 200) g;
    """
    prod, stg, cfg = source_and_staging(script)
    settings = load_settings(str(cfg))
    envs = resolve_environments(settings, None, None)
    report = check_refresh(settings, *envs)
    assert [f.split(" ")[0] for f in report.unmasked_personal] == ["member_logins.member_email"]
    assert yaml.safe_load(report.suggested) == {"member_logins": {"member_email": {"faker": "email"}},
                                                "members": {"handle": {"faker": "email"}}}
    assert "masked as member_logins.member_email (member_logins_member_email_fkey), so joins hold" in report.suggested
    assert report.suggestion_check is None
    paste(cfg, report.suggested)
    done = refresh(load_settings(str(cfg)), *envs)
    assert done.leaks.ok
    assert rows(stg, "SELECT count(*) FROM member_logins l JOIN members m ON m.handle = l.member_email "
                     "WHERE m.handle LIKE '%%@%%'") == [(200,)]
