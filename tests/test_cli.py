"""The nimu-rt command as a user runs it: a real process in an empty directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support import WAIT_S, new_schema_name

ROOT = Path(__file__).resolve().parent.parent


def nimu_rt(*args: str, cwd: Path, env: dict[str, str] | None = None, **kw):
    return subprocess.run(
        [sys.executable, "-m", "nimu_rt", *args],
        cwd=cwd,
        env=_clean_env(env),
        capture_output=True,
        text=True,
        timeout=WAIT_S * 3,
        **kw,
    )


def _clean_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIMU_")}
    env.pop("PORT", None)
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra or {})
    return env


@pytest.mark.parametrize("command", ["serve", "migrate", "token", "veo3-sim"])
def test_every_subcommand_has_help(tmp_path: Path, command: str):
    result = nimu_rt(command, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: nimu-rt {command}")


def test_token_prints_the_token_alone(tmp_path: Path):
    result = nimu_rt("token", "--user", "alice", "--role", "admin", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert result.stdout == token + "\n"
    assert re.fullmatch(r"[\w-]+\.[\w-]+\.[\w-]+", token)
    # The dev key was made once and is reused by the next command.
    key = (tmp_path / "data" / "dev-signing-key").read_text()
    again = nimu_rt("token", "--user", "bob", cwd=tmp_path)
    assert (tmp_path / "data" / "dev-signing-key").read_text() == key
    assert again.stdout.count(".") == 2


def test_token_refuses_a_user_id_with_a_slash(tmp_path: Path):
    result = nimu_rt("token", "--user", "a/b", cwd=tmp_path)
    assert result.returncode == 2
    assert "sub claim" in result.stderr
    assert result.stdout == ""


def test_serve_in_an_empty_directory(tmp_path: Path):
    """The README's first command: SQLite and files under ./data, a dev token."""
    log_path = tmp_path / "stderr.log"
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "nimu_rt", "serve", "--port", "0"],
        cwd=tmp_path,
        env=_clean_env(None),
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        assert process.stdout is not None
        banner = [process.stdout.readline() for _ in range(4)]
        url = re.search(r"serving on (http://\S+)", banner[0])[1]
        assert "sqlite" in banner[1]
        assert "dev token" in banner[2]
        token = banner[3].strip()

        with httpx.Client(base_url=url, timeout=WAIT_S) as client:
            headers = {"Authorization": f"Bearer {token}"}
            r = client.post(
                "/api/generations",
                json={"prompt": "a cat"},
                headers=headers,
            )
            assert r.status_code == 201, r.text
            assert r.json()["userId"] == "dev"
            assert r.json()["status"] == "pending_clarification"
        assert (tmp_path / "data" / "nimu.db").is_file()
    finally:
        process.terminate()
        process.wait(timeout=WAIT_S)
        process.stdout.close()
        log.close()
    # uvicorn re-raises SIGTERM after its graceful shutdown, which ran.
    assert process.returncode == -15
    assert "action=instance.stop" in log_path.read_text()


def test_serve_reports_a_port_in_use(tmp_path: Path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = nimu_rt("serve", "--port", str(port), cwd=tmp_path)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


@pytest.mark.postgres
def test_migrate_then_serve_on_postgres(tmp_path: Path, pg_url: str):
    schema = new_schema_name()
    env = {"NIMU_DATABASE_URL": pg_url, "NIMU_DATABASE_SCHEMA_NAME": schema}
    try:
        # Without migrations the server refuses to start, saying what to do.
        result = nimu_rt("serve", "--port", "0", cwd=tmp_path, env=env)
        assert result.returncode == 2
        assert "run `nimu-rt migrate`" in result.stderr

        result = nimu_rt("migrate", cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "applied migrations 1, 2, 3, 4\n"
        result = nimu_rt("migrate", cwd=tmp_path, env=env)
        assert result.stdout == "the schema is up to date\n"
    finally:
        from tests.conftest import run_beside_loop
        from tests.support import drop_schema

        run_beside_loop(drop_schema(pg_url, schema))
