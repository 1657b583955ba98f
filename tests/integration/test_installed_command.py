"""The installed ``topology`` command works from any directory (adr/0015): nothing it
loads at run time (migrations, the outbox SQL, the schemas) may depend on the repository
being the current directory, where the top folders would import as packages of their own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.servers import Servers

TOPOLOGY = shutil.which("topology", path=str(Path(sys.executable).parent)) or "topology"


@pytest.fixture
def empty_database(servers: Servers) -> Iterator[str]:
    name = f"topology_empty_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(servers.postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = conninfo_to_dict(make_conninfo(servers.postgres_url, dbname=name))
    auth = params.get("user", "postgres") + (f":{params['password']}" if params.get("password") else "")
    yield f"postgresql://{auth}@{params.get('host', '127.0.0.1')}:{params.get('port', '5432')}/{name}"
    with psycopg.connect(servers.postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOPOLOGY_") and k != "PYTHONPATH"}
    return subprocess.run([TOPOLOGY, *args], cwd=cwd, env={**clean, **env}, capture_output=True, text=True,
                          timeout=120)


def test_migrate_relay_schema_and_schema_check_run_outside_the_repository(empty_database: str, tmp_path: Path
                                                                          ) -> None:
    migrated = run(["migrate"], tmp_path, TOPOLOGY_DATABASE_URL=empty_database)
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    with psycopg.connect(empty_database) as conn:
        assert conn.execute("SELECT to_regclass('topology_outbox') IS NOT NULL").fetchone() == (True,)
    outbox = run(["relay", "--init-schema", "--source", empty_database], tmp_path)
    assert outbox.returncode == 0, outbox.stderr[-3000:]
    checked = run(["schemas", "check"], tmp_path)
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert "every pair readable both ways" in checked.stdout
