"""The client tools' version recorded in every manifest is the tool's own number, whatever the packager appends."""

from __future__ import annotations

import os
import stat

from dataops.tasks import pg


def test_the_embedded_pg_dump_reports_its_release(pg_server_dsn):
    major = pg.server_version(pg_server_dsn)[0]
    version = pg.client_version(pg.client_binary("pg_dump", major))
    assert version.split(".")[0] == str(major) and version.replace(".", "").isdigit(), version


def test_a_debian_packaged_tool_reports_the_release_not_the_package_suffix(tmp_path):
    # Debian's pg_dump prints its package version after the release: `15.18 (Debian 15.18-0+deb12u1)`;
    # the manifest once recorded `15.18-0+deb12u1)`.
    tool = tmp_path / "pg_dump"
    tool.write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)'\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    assert pg.client_version(os.fspath(tool)) == "15.18"
    tool.write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 17beta1'\n")
    assert pg.client_version(os.fspath(tool)) == "17beta1"
