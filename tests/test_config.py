"""Config resolution and validation (pure: files in a temp folder, no sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from respworkers.config import Config, load, parse
from respworkers.errors import ConfigError

pytestmark = pytest.mark.timeout(10)


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RW_CONFIG", raising=False)
    assert load() == Config()  # nothing anywhere: built-in defaults
    (tmp_path / "respworkers.toml").write_text("[broker]\ntries = 4\n")
    assert load().broker.tries == 4
    env = tmp_path / "env.toml"
    env.write_text("[broker]\ntries = 5\n")
    monkeypatch.setenv("RW_CONFIG", str(env))
    assert load().broker.tries == 5
    explicit = tmp_path / "explicit.toml"
    explicit.write_text("[broker]\ntries = 6\n")
    cfg = load(explicit)
    assert cfg.broker.tries == 6 and cfg.source == str(explicit)
    assert cfg.override("broker", tries=9, timeout=None).broker.tries == 9  # flags win


def test_missing_files_are_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load(tmp_path / "nope.toml")
    monkeypatch.setenv("RW_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError, match=r"from \$RW_CONFIG"):
        load()


@pytest.mark.parametrize(
    "text, message",
    [
        ("[broker\n", "not valid TOML"),
        ("[brokr]\n", "unknown section [brokr] (did you mean [broker]?)"),
        ("[broker]\ntimeout = 0\n", "[broker] timeout: must be a number of seconds greater than 0"),
        ("[broker]\ntimeout = 'x'\n", "[broker] timeout: must be a number of seconds"),
        ("[broker]\ntries = 1.5\n", "[broker] tries: must be a whole number"),
        ("[broker]\nclients = 'localhost:1'\n", "is not a ZeroMQ endpoint"),
        ("[broker]\nclients = 'tcp://127.0.0.1'\n", "needs tcp://HOST:PORT"),
        ("[worker]\nprocesses = 0\n", "[worker] processes: must be at least 1"),
        ("[worker]\nqueues = ['ok', 'not ok']\n", "[worker] queues: bad queue"),
        ("[client]\nbrokr = 'tcp://a:1'\n", "unknown key 'brokr' (did you mean 'broker'?)"),
        ("broker = 1\n", "[broker] must be a table"),
    ],
)
def test_bad_values_name_file_section_and_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(text, "conf.toml")
    assert str(err.value).startswith("conf.toml: ")
    assert message in str(err.value)


def test_flags_are_validated_and_named() -> None:
    with pytest.raises(ConfigError, match="--processes: must be at least 1"):
        Config().override("worker", processes=0)


def test_example_config_documents_every_key_with_its_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    example = Path(__file__).parent.parent / "config.example.toml"
    cfg = parse(example.read_text(), str(example))
    assert cfg.broker == Config().broker
    assert cfg.worker == Config().worker
    assert cfg.client == Config().client
