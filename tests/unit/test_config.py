"""Settings: layering, and one clear line for every kind of bad value."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import msgspec
import pytest

from nimu_rt.config import DEFAULT_FILE, Settings, load_settings
from nimu_rt.errors import ConfigError


def test_default_toml_documents_exactly_the_struct_defaults():
    # Every key of the structs is in the file, with the same value, and the
    # file has no key the structs lack: the documentation cannot drift.
    from_file = tomllib.loads(DEFAULT_FILE.read_text())
    assert from_file == msgspec.to_builtins(Settings())


def test_layers_file_then_env(tmp_path: Path):
    extra = tmp_path / "prod.toml"
    extra.write_text('[server]\nport = 9000\nhost = "0.0.0.0"\n')
    settings = load_settings(
        env={"NIMU_CONFIG": str(extra), "NIMU_SERVER_PORT": "9100"}
    )
    assert settings.server.host == "0.0.0.0"  # from the file
    assert settings.server.port == 9100  # env wins over the file
    assert settings.database.pool_max_size == 10  # untouched default


def test_env_names_map_to_sections_with_underscored_keys():
    settings = load_settings(
        env={
            "NIMU_DATABASE_URL": "postgresql://u@h/db",
            "NIMU_DATABASE_POOL_MAX_SIZE": "3",
            "NIMU_AUTH_ALGORITHMS": '["HS256", "HS384"]',
            "NIMU_DATABASE_AUTO_MIGRATE": "true",
            # Harness variables are not settings and are ignored.
            "NIMU_TEST_DATABASE_URL": "x",
            "NIMU_REQUIRE_POSTGRES": "1",
        }
    )
    assert settings.database.url == "postgresql://u@h/db"
    assert settings.database.pool_max_size == 3
    assert settings.database.auto_migrate is True
    assert settings.auth.algorithms == ["HS256", "HS384"]
    assert not settings.embedded


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"NIMU_SERVER_PORT": "eighty"}, "server.port: Expected `int`"),
        ({"NIMU_SERVER_PORT": "70000"}, "server.port: Expected `int` <= 65535"),
        ({"NIMU_SERVER_PROT": "1"}, "NIMU_SERVER_PROT: unknown setting server.prot"),
        ({"NIMU_NOPE_X": "1"}, "NIMU_NOPE_X: unknown setting"),
        ({"NIMU_LOGGING_LEVEL": "LOUD"}, "logging.level: Invalid enum value 'LOUD'"),
        ({"NIMU_AUTH_ALGORITHMS": "[oops"}, "NIMU_AUTH_ALGORITHMS: not valid JSON"),
    ],
)
def test_bad_env_values_name_the_key(env, expected):
    with pytest.raises(ConfigError) as caught:
        load_settings(env=env)
    message = str(caught.value)
    assert message.startswith(expected), message
    assert "\n" not in message
    if "Expected" in expected or "enum" in expected:
        assert "(from NIMU_" in message


def test_unknown_key_in_a_file_names_key_and_file(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nprot = 1\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"NIMU_CONFIG": str(bad)})
    assert str(caught.value) == f"server.prot: unknown setting (from {bad})"


def test_unknown_section_in_a_file(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[serverz]\nport = 1\n")
    with pytest.raises(ConfigError, match=r"^serverz: unknown setting"):
        load_settings(env={"NIMU_CONFIG": str(bad)})


def test_a_price_row_missing_a_rate(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[pricing."veo-x"]\n"720p" = { audio = 0.1 }\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"NIMU_CONFIG": str(bad)})
    assert str(caught.value).startswith(
        "pricing.veo-x.720p.silent: required setting is missing"
    )


def test_missing_config_file_is_reported():
    with pytest.raises(ConfigError, match="NIMU_CONFIG: no such file"):
        load_settings(env={"NIMU_CONFIG": "/nonexistent/x.toml"})


def test_the_command_stops_with_one_line(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "nimu_rt", "token", "--user", "a"],
        env={"NIMU_SERVER_PORT": "-1", "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "nimu-rt: server.port: Expected `int` >= 0 (from NIMU_SERVER_PORT)\n"
    )
