"""One TOML config for every command, resolved once and validated with messages that name the culprit.

Resolution order: ``-c/--config PATH``, else ``$RW_CONFIG``, else ``./respworkers.toml``
if present, else the built-in defaults (which work on one machine). Command-line
flags override the file; :meth:`Config.override` re-validates them, naming the flag.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError, FlagError
from .options import check_timeout

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

ENV_VAR = "RW_CONFIG"
LOCAL_FILE = "respworkers.toml"

DEFAULT_CLIENTS = "tcp://127.0.0.1:7781"
DEFAULT_WORKERS = "tcp://127.0.0.1:7782"
DEFAULT_STATUS = "tcp://127.0.0.1:7783"


def _endpoint(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string such as 'tcp://127.0.0.1:7781'")
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("tcp", "ipc", "inproc") or not rest:
        raise ValueError(f"{value!r} is not a ZeroMQ endpoint (tcp://host:port, ipc://path)")
    if scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not host or not (port == "*" or (port.isdigit() and int(port) < 65536)):
            raise ValueError(f"{value!r} needs tcp://HOST:PORT with a port from 0 to 65535")
    return value


def _positive_float(value: Any) -> float:
    seconds = check_timeout(value, "")  # the rule job time limits follow
    if seconds is None:
        raise ValueError("must be a number of seconds")
    return seconds


def _seconds_or_zero(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a number of seconds")
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a number of seconds, 0 or more")
    return float(value)


def _weights(value: Any) -> dict[str, int]:
    from .protocol import check_name

    if not isinstance(value, dict):
        raise ValueError('must be a table of tenant = weight, e.g. { acme = 3, batch = 1 }')
    out: dict[str, int] = {}
    for name, weight in value.items():
        try:
            check_name(str(name).encode(), "tenant")
        except Exception as exc:
            raise ValueError(str(exc)) from None
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 1000:
            raise ValueError(f"{name}: a weight is a whole number from 1 to 1000")
        out[str(name)] = weight
    return out


def _commit_interval(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a number of seconds")
    if not math.isfinite(value) or not 0 <= value <= 1:
        raise ValueError("must be between 0 and 1 second")
    return float(value)


def _int_at_least(minimum: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be a whole number")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}")
        return value

    return check


def queue_list(value: Any) -> tuple[str, ...]:
    """Queue names from a list (or a comma-separated string); ValueError says what is wrong."""
    from .protocol import MAX_WORKER_QUEUES, check_queue

    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of queue names")
    if len(value) > MAX_WORKER_QUEUES:
        raise ValueError(f"at most {MAX_WORKER_QUEUES} queues")
    try:
        return tuple(check_queue(v.encode()) for v in value)
    except Exception as exc:
        raise ValueError(str(exc)) from None


def _default_journal() -> str:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join("~", ".local", "state")
    return os.path.join(state, "respworkers", "journal.sqlite3")


def _journal(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError('must be a file path, or ":memory:" to keep jobs in memory only')
    return value


def _sync(value: Any) -> str:
    if value not in ("normal", "full"):
        raise ValueError('must be "normal" (survives a broker crash) or "full" (also a power cut)')
    return str(value)


def _opt_path(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a path (a string); empty means not set")
    return value


def _size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be a whole number of bytes")
    if value < 1024:
        raise ValueError("must be at least 1024 bytes")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _log_level(value: Any) -> str:
    levels = ("debug", "info", "warning", "error")
    if not isinstance(value, str) or value.lower() not in levels:
        raise ValueError(f"must be one of {', '.join(levels)}")
    return value.lower()


def _log_format(value: Any) -> str:
    from .logs import check_format

    return check_format(value)


def _metrics_address(value: Any) -> str:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) of the broker's Prometheus endpoint; "" is off."""
    usage = 'must be "HOST:PORT" such as "127.0.0.1:9781", or "" for no metrics endpoint'
    if not isinstance(value, str):
        raise ValueError(usage)
    if not value:
        return value
    host, colon, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or "://" in value or any(c.isspace() for c in value):
        raise ValueError(f"{value!r}: {usage}")
    if not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"{value!r}: the port must be a number from 1 to 65535")
    return value


def _prefetch(value: Any) -> int:
    """Jobs one worker process may hold: 1 (strict on demand) to 1000; 0: the class's."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not a whole number (1 to 1000, or 0 for the "
                         "worker class's `prefetch`)")
    if not 0 <= value <= 1000:
        raise ValueError(f"{value} is not from 1 to 1000 (or 0 for the worker class's "
                         "`prefetch`)")
    return value


def _check(fn: Callable[[Any], Any], doc: str) -> dict[str, Any]:
    return {"check": fn, "doc": doc}


def _path(doc: str) -> dict[str, Any]:
    """A file or folder: relative values in a config file are relative to that file."""
    return {"check": _opt_path, "doc": doc, "path": True}


@dataclass(frozen=True)
class BrokerConfig:
    clients: str = field(default=DEFAULT_CLIENTS, metadata=_check(_endpoint, "endpoint"))
    workers: str = field(default=DEFAULT_WORKERS, metadata=_check(_endpoint, "endpoint"))
    status: str = field(default=DEFAULT_STATUS, metadata=_check(_endpoint, "endpoint"))
    timeout: float = field(default=60.0, metadata=_check(_positive_float, "seconds"))
    tries: int = field(default=3, metadata=_check(_int_at_least(1), "count"))
    heartbeat: float = field(default=1.0, metadata=_check(_positive_float, "seconds"))
    liveness: int = field(default=3, metadata=_check(_int_at_least(1), "count"))
    retention: float = field(default=3600.0, metadata=_check(_positive_float, "seconds"))
    max_retained: int = field(default=100_000, metadata=_check(_int_at_least(0), "count"))
    journal: str = field(default_factory=_default_journal,
                         metadata={**_check(_journal, "path"), "path": True})
    journal_sync: str = field(default="normal", metadata=_check(_sync, "mode"))
    commit_interval: float = field(default=0.005, metadata=_check(_commit_interval, "seconds"))
    # --- security and limits (README: Security) ---
    secret_key: str = field(default="", metadata=_path("the broker's secret key file"))
    client_keys: str = field(default="", metadata=_path("folder of allowed client public keys"))
    worker_keys: str = field(default="", metadata=_path("folder of allowed worker public keys"))
    status_keys: str = field(default="", metadata=_path("folder of keys allowed to read status"))
    max_message_size: int = field(default=64 << 20, metadata=_check(_size, "bytes"))
    max_queued: int = field(default=1_000_000, metadata=_check(_int_at_least(1), "count"))
    max_timeout: float = field(default=86400.0, metadata=_check(_positive_float, "seconds"))
    max_tries: int = field(default=100, metadata=_check(_int_at_least(1), "count"))
    # --- retries and fair shares (README: Retries, Fair share) ---
    backoff: float = field(default=1.0, metadata=_check(_seconds_or_zero, "seconds"))
    backoff_max: float = field(default=600.0, metadata=_check(_seconds_or_zero, "seconds"))
    retry_elsewhere_wait: float = field(default=5.0, metadata=_check(_seconds_or_zero, "seconds"))
    tenant_weights: dict[str, int] = field(default_factory=dict,
                                           metadata=_check(_weights, "weights"))
    log_level: str = field(default="info", metadata=_check(_log_level, "level"))
    log_format: str = field(default="text", metadata=_check(_log_format, "format"))


    # --- operations (README: Metrics): Prometheus endpoint, "" = off ---
    metrics: str = field(default="", metadata=_check(_metrics_address, "HOST:PORT"))


@dataclass(frozen=True)
class WorkerConfig:
    broker: str = field(default=DEFAULT_WORKERS, metadata=_check(_endpoint, "endpoint"))
    processes: int = field(default=1, metadata=_check(_int_at_least(1), "count"))
    # --- autoscaling (README: Pools): with min_processes, `processes` is the most ---
    min_processes: int = field(default=0, metadata=_check(_int_at_least(0), "count"))
    scale_down_after: float = field(default=30.0, metadata=_check(_positive_float, "seconds"))
    # --- recycling: 0 means never ---
    max_jobs_per_child: int = field(default=0, metadata=_check(_int_at_least(0), "count"))
    max_memory_per_child: int = field(default=0, metadata=_check(_int_at_least(0), "MB"))
    reload: bool = field(default=False, metadata=_check(_flag, "flag"))
    queues: tuple[str, ...] = field(default=(), metadata=_check(queue_list, "queues"))
    heartbeat: float = field(default=1.0, metadata=_check(_positive_float, "seconds"))
    liveness: int = field(default=3, metadata=_check(_int_at_least(1), "count"))
    cancel_grace: float = field(default=10.0, metadata=_check(_seconds_or_zero, "seconds"))
    # Jobs a process may hold at once (README: Prefetch); 0: the Worker class's `prefetch`.
    prefetch: int = field(default=0, metadata=_check(_prefetch, "count"))
    secret_key: str = field(default="", metadata=_path("this worker's secret key file"))
    broker_key: str = field(default="", metadata=_path("the broker's public key file"))
    log_level: str = field(default="info", metadata=_check(_log_level, "level"))
    log_format: str = field(default="text", metadata=_check(_log_format, "format"))


@dataclass(frozen=True)
class ClientConfig:
    broker: str = field(default=DEFAULT_CLIENTS, metadata=_check(_endpoint, "endpoint"))
    status: str = field(default=DEFAULT_STATUS, metadata=_check(_endpoint, "endpoint"))
    request_timeout: float = field(default=5.0, metadata=_check(_positive_float, "seconds"))
    secret_key: str = field(default="", metadata=_path("this client's secret key file"))
    broker_key: str = field(default="", metadata=_path("the broker's public key file"))
    log_format: str = field(default="text", metadata=_check(_log_format, "format"))


_SECTIONS: dict[str, type] = {"broker": BrokerConfig, "worker": WorkerConfig, "client": ClientConfig}


@dataclass(frozen=True)
class Config:
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    source: str = "built-in defaults"  #: where the values came from, for messages

    def override(self, section: str, **flags: Any) -> Config:
        """Return a copy with command-line flags applied; ``None`` means "not given"."""
        given = {k: v for k, v in flags.items() if v is not None}
        if not given:
            return self
        current = getattr(self, section)
        fields = _fields(type(current))
        checked = {}
        for key, value in given.items():
            try:
                checked[key] = fields[key].metadata["check"](value)
            except ValueError as exc:
                raise FlagError(f"--{key.replace('_', '-')}", str(exc)) from None
        return dataclasses.replace(self, **{section: dataclasses.replace(current, **checked)})


def _fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _validate(f: dataclasses.Field[Any], value: Any, where: str) -> Any:
    try:
        return f.metadata["check"](value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _build(section: str, table: Any, source: str, base: Path | None) -> Any:
    cls = _SECTIONS[section]
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{section}] must be a table")
    fields = _fields(cls)
    names = list(fields)
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            hint = difflib.get_close_matches(key, names, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{source}: [{section}] unknown key {key!r}{extra}")
        value = _validate(fields[key], value, f"{source}: [{section}] {key}")
        if fields[key].metadata.get("path") and value and base is not None and value != ":memory:":
            expanded = os.path.expanduser(value)
            if not os.path.isabs(expanded):
                value = str(base / expanded)
        values[key] = value
    return cls(**values)


def parse(text: str, source: str, base: Path | None = None) -> Config:
    """Parse TOML text; every error names ``source`` and the offending section/key.

    Relative paths in it are taken relative to ``base`` (the file's folder).
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    sections: dict[str, Any] = {}
    for name, table in data.items():
        if name not in _SECTIONS:
            hint = difflib.get_close_matches(name, list(_SECTIONS), n=1)
            extra = f" (did you mean [{hint[0]}]?)" if hint else ""
            raise ConfigError(f"{source}: unknown section [{name}]{extra}")
        sections[name] = _build(name, table, source, base)
    return Config(**sections, source=source)


def find_path(explicit: str | os.PathLike[str] | None) -> Path | None:
    """Which file to read, by the documented precedence; ``None`` means built-in defaults."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    local = Path(LOCAL_FILE)
    return local if local.is_file() else None


def load(explicit: str | os.PathLike[str] | None = None) -> Config:
    path = find_path(explicit)
    if path is None:
        return Config()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        origin = "" if explicit else f" (from ${ENV_VAR})" if os.environ.get(ENV_VAR) else ""
        raise ConfigError(f"cannot read config {path}{origin}: {exc.strerror or exc}") from None
    return parse(text, str(path), path.parent)
