"""``rw``: the one command operators use. Thin: parse, resolve config once, call the library."""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from . import __version__
from .config import BrokerConfig, ClientConfig, WorkerConfig, load
from .errors import (
    BrokerUnavailable,
    ConfigError,
    FlagError,
    JobFailed,
    JobFileError,
    ProtocolError,
    Refused,
    RespWorkersError,
    TargetError,
)
from .logs import FORMATS, setup

if TYPE_CHECKING:
    from .client import Client
    from .jobfile import JobSpec
    from .stream import Printer

#: Exit codes (also in the README).
RET_OK = 0
RET_JOBS_FAILED = 1
RET_USAGE = 2
RET_UNAVAILABLE = 3

#: Shortest refresh interval of the live status: anything less is a busy loop against the broker.
MIN_INTERVAL = 0.1
#: How often the live status looks for a resized terminal between refreshes, in seconds.
RESIZE_CHECK = 0.1

F = TypeVar("F", bound=Callable[..., Any])


class UnknownJob(RespWorkersError):
    """The broker does not know a job id (never submitted, refused, or no longer retained)."""


#: The one mapping from a deliberate error to an exit code; the first matching class wins.
#: Everything else respworkers raises on purpose is a usage problem: a config file, flag,
#: key, worker target, job file or job id, an endpoint in use, an unusable journal.
EXIT_CODES: tuple[tuple[type[RespWorkersError], int], ...] = (
    (BrokerUnavailable, RET_UNAVAILABLE),  # no answer in time, or our key was refused
    (JobFailed, RET_JOBS_FAILED),
    (Refused, RET_JOBS_FAILED),
    (UnknownJob, RET_JOBS_FAILED),
    (RespWorkersError, RET_USAGE),
)


def exit_code(exc: RespWorkersError) -> int:
    return next(code for cls, code in EXIT_CODES if isinstance(exc, cls))


def configured(section: str, *flags: str) -> Callable[[F], F]:
    """Give a command ``-c/--config`` and call it with its config section as first argument.

    The file is found and read once, by the documented precedence; the command's options
    named in ``flags`` override keys of ``[section]`` (a bad value is a usage error that
    names the option). Errors raised later about the section (a key file, a folder) get
    the file's name in front, so every config message reads ``FILE: [section] key: ...``.
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, config_path: str | None, **kwargs: Any) -> Any:
            cfg = load(config_path)
            given = {name: kwargs.pop(name) for name in flags}
            given["log_format"] = kwargs.pop("log_format")
            for name, value in given.items():
                if value is None or value == ():
                    continue
                try:
                    cfg = cfg.override(section, **{name: value})
                except FlagError as exc:
                    ctx = click.get_current_context()
                    param = next(p for p in ctx.command.params if p.name == name)
                    raise click.BadParameter(exc.detail, ctx=ctx, param=param) from None
            part = getattr(cfg, section)
            _logging(getattr(part, "log_level", None), part.log_format)
            try:
                return fn(part, *args, **kwargs)
            except ConfigError as exc:
                raise ConfigError(f"{cfg.source}: {exc}") from None

        run = click.option(
            "--log-format", type=click.Choice(FORMATS, case_sensitive=False),
            help=f'Log lines on stderr: "text", or "json" (one object per line). '
                 f"Default: [{section}] log_format, else text.",
        )(run)
        return click.option(
            "-c", "--config", "config_path", metavar="PATH", envvar=None,
            help="TOML config (default: $RW_CONFIG, else ./respworkers.toml, else built-in defaults).",
        )(run)  # type: ignore[return-value]

    return decorate


def _keys(part: Any, section: str) -> Any:
    """The CURVE keys of a [client]/[worker] section, None without; ConfigError if unusable."""
    from .security import client_keys

    return client_keys(part.secret_key, part.broker_key, section)


def _job_ids(job_ids: Iterable[str]) -> list[str]:
    """The ids, without repeats, each checked before the broker is asked.

    A malformed id is the caller's mistake (exit 2), not the broker's silence (exit 3).
    """
    from .protocol import check_job_id

    ids = list(dict.fromkeys(job_ids))
    for job_id in ids:
        check_job_id(job_id.encode())
    return ids


def _logging(level: str | None, fmt: str) -> None:
    """Log setup for every command, before it does anything that logs.

    The broker and workers log at their ``log_level``. Client commands have none: they
    log only warnings, and in text keep Python's bare default, so their output reads as
    it always did; JSON is asked for by scripts and shippers, so every line is an object.
    """
    if level is not None:
        setup(level, fmt)
    elif fmt == "json":
        setup(logging.WARNING, fmt)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rw")
def cli() -> None:
    """respworkers: a responsible ZeroMQ task broker and worker pool."""


# ================================================================================= broker
@cli.command()
@configured("broker", "clients", "workers", "status", "timeout", "tries", "backoff", "journal",
            "log_level", "metrics")
@click.option("--clients", metavar="ENDPOINT", help="Endpoint clients submit to.")
@click.option("--workers", metavar="ENDPOINT", help="Endpoint workers connect to.")
@click.option("--status", metavar="ENDPOINT", help="Endpoint status queries go to.")
@click.option("--timeout", type=float, help="Default seconds one attempt may take.")
@click.option("--tries", type=int, help="Default attempts before a job fails.")
@click.option("--backoff", type=float, metavar="SECONDS",
              help="Default delay before a first retry, doubling after (0: retry at once).")
@click.option("--journal", metavar="PATH", help='sqlite journal file, or ":memory:".')
@click.option("--log-level", help="debug, info, warning or error.")
@click.option("--metrics", metavar="HOST:PORT",
              help="Serve Prometheus metrics there (needs respworkers[metrics]).")
def broker(conf: BrokerConfig) -> None:
    """Run the broker until Ctrl-C or SIGTERM."""
    from .broker.server import run_broker

    run_broker(conf)


# ================================================================================= worker
def _pool_size(ctx: click.Context, param: click.Parameter, value: str | None
               ) -> tuple[int, int] | None:
    """``-n 4`` (a fixed pool) or ``-n 2:8`` (autoscaling between 2 and 8)."""
    if value is None:
        return None
    low, colon, high = value.partition(":")
    try:
        lo, hi = int(low), int(high if colon else low)
    except ValueError:
        raise click.BadParameter(f"{value!r}: give N or MIN:MAX, e.g. 4 or 2:8") from None
    if lo < 1 or hi < lo:
        raise click.BadParameter(f"{value!r}: need 1 <= MIN <= MAX")
    return (lo, hi) if colon else (0, hi)


@cli.command()
@click.argument("targets", nargs=-1, required=True, metavar="TARGET...")
@configured("worker", "broker", "queues", "max_jobs_per_child", "max_memory_per_child",
            "scale_down_after", "prefetch", "log_level")
@click.option("--broker", metavar="ENDPOINT", help="The broker's workers endpoint.")
@click.option("-n", "--processes", "size", metavar="N|MIN:MAX", callback=_pool_size,
              help="Worker processes: N, or MIN:MAX to grow with the work and shrink when idle.")
@click.option("-q", "--queue", "queues", multiple=True, metavar="NAME",
              help="Queue to serve (repeatable); overrides the class's `queues` (one class only).")
@click.option("--max-jobs-per-child", type=int, metavar="N",
              help="Replace a process after N jobs (0: never).")
@click.option("--max-memory-per-child", type=int, metavar="MB",
              help="Replace a process once it uses more than MB of resident memory after a job.")
@click.option("--scale-down-after", type=float, metavar="SECONDS",
              help="With -n MIN:MAX: retire a process idle this long (default 30).")
@click.option("--prefetch", type=click.IntRange(1, 1000), metavar="N",
              help="Jobs a process may hold at once (default: the class's `prefetch`, 1); "
              "more suits many tiny jobs.")
@click.option("--reload", is_flag=True, default=False,
              help="Restart the processes when a .py file under this folder changes (development).")
@click.option("--log-level", help="debug, info, warning or error.")
def worker(conf: WorkerConfig, targets: tuple[str, ...], size: tuple[int, int] | None,
           reload: bool) -> None:
    """Run a pool of worker processes for each TARGET: MODULE:CLASS (a respworkers.Worker), or
    MODULE for every Worker class defined in it. With several classes, each serves its own
    queues and a job runs in the class of its queue."""
    import dataclasses

    from .config import queue_list
    from .targets import import_targets
    from .worker.pool import run_pool
    from .worker.runner import prefetch_of, routes

    classes = import_targets(targets)
    if size is not None:
        conf = dataclasses.replace(conf, min_processes=size[0], processes=size[1])
    if reload:
        conf = dataclasses.replace(conf, reload=True)
    if conf.min_processes > conf.processes:
        raise ConfigError(f"[worker] min_processes ({conf.min_processes}) is more than "
                          f"processes ({conf.processes})")
    _keys(conf, "worker")  # a bad key fails here, not once per child process
    if len(classes) > 1 and conf.queues:
        raise click.UsageError("-q/--queue (or [worker] queues) applies to one worker class; "
                               "with several, each serves its own `queues`")
    for cls in classes:
        try:
            queue_list(cls.queues)
        except ValueError as exc:
            raise TargetError(f"{cls.__module__}:{cls.__qualname__}.queues = {cls.queues!r}: "
                              f"{exc}") from None
    try:
        serve = conf.queues or (queue_list(classes[0].queues) if len(classes) == 1
                                else tuple(routes(classes, ())))
    except ValueError as exc:
        raise TargetError(str(exc)) from None
    try:
        prefetch_of(classes, conf.prefetch)
    except ValueError as exc:
        raise TargetError(str(exc)) from None
    names = ", ".join(f"{c.__module__}:{c.__qualname__}" for c in classes)
    size_text = (f"{conf.min_processes}..{conf.processes}" if conf.min_processes
                 else str(conf.processes))
    logging.getLogger(__name__).info(
        "%s x %s serving %s, broker %s", size_text, names, ",".join(serve), conf.broker)
    sys.exit(run_pool(targets, conf, tuple(serve)))


# ================================================================================= submit
@cli.command()
@click.argument("jobfile", required=False, metavar="JOBFILE")
@configured("client", "broker")
@click.option("--broker", metavar="ENDPOINT", help="The broker's clients endpoint.")
@click.option("-p", "--payload", "payloads", multiple=True, metavar="TEXT",
              help="Submit TEXT as a job (repeatable), instead of or besides a job file.")
@click.option("--payload-file", "payload_files", multiple=True, metavar="PATH",
              type=click.Path(dir_okay=False, allow_dash=True),
              help="Submit the bytes of file PATH as a job (repeatable; '-': stdin).")
@click.option("--queue", help="Queue for jobs that name none.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              help="Time limit (seconds) for jobs that set none.")
@click.option("--tries", type=click.IntRange(min=1), help="Tries for jobs that set none.")
@click.option("--priority", type=click.IntRange(0, 9),
              help="0..9, higher runs first (default 5), for jobs that set none.")
@click.option("--delay", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Run the jobs no sooner than this many seconds from now.")
@click.option("--eta", metavar="TIME",
              help="Run the jobs no sooner than TIME (ISO 8601, e.g. 2026-12-01T09:00:00Z).")
@click.option("--expires", metavar="SECONDS|TIME",
              help="A job not started by then (seconds from now, or a time) ends expired.")
@click.option("--tenant", metavar="NAME",
              help="Whose jobs these are: tenants take turns within a queue (fair share).")
@click.option("--backoff", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Delay before a retry, doubling per attempt (0: retry at once).")
@click.option("--backoff-max", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Longest delay before a retry.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per job.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--no-wait", is_flag=True,
              help="Print the job ids once the broker has them; fetch results with rw result.")
@click.option("--new-ids", is_flag=True,
              help="Give the file's jobs without an \"id\" fresh random ids: run them again "
                   "rather than attach to the jobs of an earlier run of the same file.")
@click.option("--out", "out_dir", metavar="DIR",
              help="Write each result to DIR/ID (several frames: DIR/ID.0, DIR/ID.1, ...) "
                   "instead of printing it; DIR is created if its parent exists.")
def submit(
    conf: ClientConfig, jobfile: str | None, payloads: tuple[str, ...], payload_files: tuple[str, ...],
    queue: str | None, timeout: float | None, tries: int | None, priority: int | None,
    delay: float | None, eta: str | None, expires: str | None, tenant: str | None,
    backoff: float | None, backoff_max: float | None, as_json: bool, no_progress: bool,
    no_wait: bool, new_ids: bool, out_dir: str | None,
) -> None:
    """Submit the jobs in JOBFILE ('-' for stdin) and print each result as it arrives.

    JOBFILE holds one JSON object, an array of them, or JSON Lines. Each job has one of
    "payload" (text or JSON), "payload_b64" (base64) or "payload_file" (a path relative
    to JOBFILE's folder), the last two also as a list of frames, and optionally "id",
    "queue", "timeout" (seconds), "tries", "priority", "delay" (seconds), "eta" (a time),
    "expires" (seconds or a time), "tenant", "backoff" and "backoff_max" (seconds); a
    job's own fields win over the options. Results are printed in the order the jobs
    end, one line per job with its id (--json: one object per line); a result that is
    not text shows as its size and first bytes. A single job's progress shows while it
    runs. Exits 1 if any job did not succeed.
    """
    from . import jobfile as jf
    from . import protocol
    from .client import Client, new_job_id
    from .stream import Interrupted, Printer, Signals, follow, summary

    if queue is not None:
        try:
            protocol.check_queue(queue.encode())
        except RespWorkersError as exc:
            raise click.BadParameter(str(exc), param_hint="--queue") from None
    defaults = _option_flags(priority=priority, delay=delay, eta=eta, expires=expires,
                             tenant=tenant, backoff=backoff, backoff_max=backoff_max)
    if out_dir is not None and no_wait:
        raise click.UsageError("--out writes results: it cannot go with --no-wait")
    if payload_files.count("-") + (jobfile == "-") > 1:
        raise click.UsageError("stdin can be read once: give '-' as JOBFILE or as one --payload-file")
    budget = jf.Budget()  # the payloads read, job file and --payload-file together
    specs = [(jf.JobSpec(p.encode()), new_job_id()) for p in payloads]
    origins: dict[str, str] = {}  # where jobs that are not in the job file came from, by id
    for path in payload_files:
        job_id = new_job_id()
        specs.append((jf.JobSpec(jf.read_payload_file(path, budget)), job_id))
        origins[job_id] = f"--payload-file {_source(path)}: "
    random_ids = {job_id for _, job_id in specs}  # ids the same command would not give again
    if jobfile is not None:
        from_file = _read_jobs(jobfile, new_ids, budget.left)
        specs.extend(from_file)
        if new_ids:
            random_ids.update(job_id for spec, job_id in from_file if spec.id is None)
    if not specs:
        raise click.UsageError("give a JOBFILE ('-' for stdin), --payload TEXT or --payload-file PATH")
    if out_dir is not None:
        _out_folder(out_dir)
    jobs: list[dict[str, Any]] = [
        {**_own_options(spec.options, defaults), "payload": spec.payload, "id": job_id,
         "queue": spec.queue or queue or protocol.DEFAULT_QUEUE,
         "timeout": spec.timeout if spec.timeout is not None else timeout,
         "tries": spec.tries if spec.tries is not None else tries} for spec, job_id in specs]
    ids: list[str] = [job["id"] for job in jobs]

    out = Printer(as_json, out_dir)
    phase = "checking"
    with Signals() as signals, Client.from_config(conf) as client:
        try:
            with signals.waiting():
                for (spec, _), job in zip(specs, jobs):  # all first: nothing or everything is sent
                    try:
                        client.validate(**job)
                    except (ValueError, ProtocolError) as exc:
                        where = (f"{_source(jobfile or '-')}: line {spec.line}: " if spec.line
                                 else origins.get(job["id"], ""))
                        raise JobFileError(f"{where}{exc} (nothing was submitted)") from None
                phase = "sending"
                client.submit_many(jobs)
                phase = "sent"
                _warn_unserved(conf, {job["queue"] for job in jobs}, out)
                if no_wait:
                    client.wait_confirmed(ids)
            if no_wait:
                for job_id in ids:
                    click.echo(json.dumps({"id": job_id, "status": "accepted"}) if as_json else job_id)
                return
            follow(client, ids, out, signals, progress=not no_progress)
        except Interrupted:
            if phase == "checking":
                out.say("interrupted: nothing was submitted")
            else:
                _interrupted(client, ids, out, phase == "sent", random_ids)
            return
    summary(out, len(ids))
    if out.failed:
        sys.exit(RET_JOBS_FAILED)


def _option_flags(**given: Any) -> dict[str, Any]:
    """``rw submit``'s job options that were given, checked now (a usage error names the flag)."""
    from .options import job_options, parse_expiry, parse_time

    flags = {k: v for k, v in given.items() if v is not None}
    try:
        if "eta" in flags:
            flags["eta"] = parse_time(flags["eta"], "--eta")
        if "expires" in flags:
            flags["expires"] = parse_expiry(flags["expires"], "--expires")
        job_options(**flags, label=lambda k: "--" + k.replace("_", "-"))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return flags


def _own_options(own: tuple[tuple[str, Any], ...], defaults: dict[str, Any]) -> dict[str, Any]:
    """A job file's options over the flags'; a job's own delay or eta replaces both flags."""
    merged = dict(defaults)
    mine = dict(own)
    if "delay" in mine or "eta" in mine:
        merged.pop("delay", None)
        merged.pop("eta", None)
    merged.update(mine)
    return merged


def _warn_unserved(conf: ClientConfig, queues: set[str], out: Printer) -> None:
    """Say at once when no worker serves a queue the jobs went to: otherwise they wait,
    silently. Asked of the status endpoint; if it does not answer, nothing is said."""
    from .client import fetch_status

    try:
        snap = fetch_status(conf.status, min(1.0, conf.request_timeout), keys=_keys(conf, "client"))
    except RespWorkersError:
        return
    known = snap.get("queues") or {}
    for name in sorted(queues):
        if (known.get(name) or {}).get("paused"):
            out.say(f"queue {name!r} is paused: its jobs wait until `rw resume {name}`", "yellow")
        elif not (known.get(name) or {}).get("workers"):
            out.say(f"no worker serves queue {name!r} yet; waiting", "yellow")


def _out_folder(path: str) -> None:
    """Create the --out folder if missing (only the last level), before anything is sent."""
    import os

    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    except FileNotFoundError:
        parent = os.path.dirname(os.path.normpath(path)) or "."
        raise click.BadParameter(f"cannot create {path}: its parent folder {parent} does not exist",
                                 param_hint="--out") from None
    except OSError as exc:
        raise click.BadParameter(f"cannot create {path}: {exc.strerror or exc}", param_hint="--out") from None
    if not os.path.isdir(path):
        raise click.BadParameter(f"{path} is not a folder", param_hint="--out")
    if not os.access(path, os.W_OK | os.X_OK):
        raise click.BadParameter(f"cannot write into {path}: permission denied", param_hint="--out")


def _read_jobs(path: str, new_ids: bool, budget: int | None = None) -> list[tuple[JobSpec, str]]:
    """The jobs of a job file ('-': stdin), each with its id.

    A job without an "id" gets one derived from the file's bytes and its place in the
    file (random ones with ``new_ids``), so that re-running an interrupted submit of the
    same file attaches to the jobs instead of running them again. Its ``payload_file``
    paths are relative to its folder (stdin: the current one); ``budget``: how many
    payload bytes it may still add up to.
    """
    import os

    from . import jobfile as jf
    from .client import new_job_id

    try:
        if path == "-":
            content = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as fh:
                content = fh.read()
        specs = jf.parse(content.decode("utf-8"), _source(path),
                         base="" if path == "-" else os.path.dirname(path),
                         budget=None if budget is None else jf.Budget(budget))
    except OSError as exc:
        raise JobFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise JobFileError(f"{_source(path)}: not UTF-8 text ({exc.reason})") from None
    except JobFileError as exc:
        raise JobFileError(f"{exc} (nothing was submitted)") from None
    # A derived id cannot clash with one written in the file: the file would have to hold
    # (a prefix of) its own SHA-256.
    derived = jf.content_ids(content)
    return [(spec, spec.id or (new_job_id() if new_ids else derived(n)))
            for n, spec in enumerate(specs, 1)]


def _source(path: str) -> str:
    return "<stdin>" if path == "-" else path


def _interrupted(client: Client, ids: list[str], out: Printer, sent: bool, random_ids: set[str]) -> None:
    """After SIGINT/SIGTERM: list the jobs still running, and say on stderr how to get them."""
    from .stream import wind_down

    pending, confirmed = wind_down(client, ids, out, sent)
    if not pending:
        out.say("interrupted; every job had ended")
        return
    again = not random_ids.intersection(pending)  # the same command names the same jobs
    head = f"interrupted: {len(pending)} of {len(ids)} jobs had not ended (listed above as pending)"
    if confirmed:
        out.say(f"{head}; they keep running on the broker. Fetch their results later with: "
                "rw result ID..." + ("; or run the same command again: it attaches to these jobs "
                                     "instead of submitting them again." if again else ""))
    else:
        out.say(f"{head}, and the broker has not confirmed that it holds all of them. " + (
            "Run the same command again: it submits any the broker lacks and attaches to the others."
            if again else "Ask with rw inspect ID; one the broker does not know must be submitted again."
        ), "yellow")


@cli.command()
@click.argument("job_ids", nargs=-1, required=True, metavar="JOB_ID...")
@configured("client", "broker")
@click.option("--broker", metavar="ENDPOINT", help="The broker's clients endpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per job.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--out", "out_dir", metavar="DIR",
              help="Write each result to DIR/ID (several frames: DIR/ID.0, DIR/ID.1, ...) "
                   "instead of printing it; DIR is created if its parent exists.")
def result(conf: ClientConfig, job_ids: tuple[str, ...], as_json: bool, no_progress: bool,
           out_dir: str | None) -> None:
    """Wait for jobs submitted earlier (by anyone) and print their results as they arrive.

    One line per job, in the order the jobs end (--json: one object per line, with
    its "id"); a result that is not text shows as its size and first bytes. Exits 1
    if any job did not succeed.
    """
    from .client import Client
    from .stream import Interrupted, Printer, Signals, follow, summary

    ids = _job_ids(job_ids)
    if out_dir is not None:
        _out_folder(out_dir)
    out = Printer(as_json, out_dir)
    with Signals() as signals, Client.from_config(conf) as client:
        try:
            follow(client, ids, out, signals, progress=not no_progress)
        except Interrupted:
            _interrupted(client, ids, out, True, set())
            return
    summary(out, len(ids))
    if out.failed:
        sys.exit(RET_JOBS_FAILED)


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr)


# ================================================================================= status
@cli.command()
@configured("client", "status")
@click.option("--status", metavar="ENDPOINT", help="The broker's status endpoint.")
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw snapshot as JSON and exit.")
@click.option("--interval", type=click.FloatRange(min=MIN_INTERVAL), default=1.0, show_default=True,
              help=f"Seconds between refreshes (at least {MIN_INTERVAL}).")
@click.option("--workers", "every_worker", is_flag=True,
              help="A row per worker, as many as fit (else only when all fit).")
@click.option("--host", "hosts", multiple=True, metavar="HOST",
              help="Only this host's workers, a row each (repeatable; a short name matches).")
def status(conf: ClientConfig, once: bool, as_json: bool, interval: float, every_worker: bool,
           hosts: tuple[str, ...]) -> None:
    """Show the broker's state: a live view sized to the terminal until Ctrl-C, or one snapshot."""
    from .client import fetch_status
    from .status import render, render_unreachable

    endpoint, wait = conf.status, conf.request_timeout
    keys = _keys(conf, "client")
    if as_json or once:
        answer = fetch_status(endpoint, wait, keys=keys)
        if as_json:
            click.echo(json.dumps(answer, indent=2))
        else:
            printer = _console()
            printer.print(render(answer, printer.width, None, every_worker, hosts))
        return
    from rich.console import Group, RenderableType
    from rich.live import Live

    from .stream import Interrupted, Signals

    def view(renderable: Any) -> Group:
        # The empty last line keeps the cursor off the last column: a terminal echoes Ctrl-C
        # as "^C" there, which would wrap onto a new line that the last redraw does not know
        # of, leaving a stray copy of the first line above the final view.
        return Group(renderable, "")

    console = _console()
    # Signals interrupt only the waiting (for the broker, for the next refresh), never a
    # redraw halfway written; SIGTERM ends the view as cleanly as Ctrl-C.
    with Signals() as signals, Live(view(render_unreachable(f"asking {endpoint} ...")),
                                    console=console, auto_refresh=False) as live:
        snap: dict[str, Any] | None = None
        problem = ""

        def draw() -> tuple[int, int]:
            size = console.size  # asked each time: the terminal may have been resized
            shown: RenderableType = (
                render(snap, size.width, size.height - 1, every_worker, hosts)  # 1: view()'s
                if snap is not None and not problem else render_unreachable(problem))
            live.update(view(shown), refresh=True)
            return size.width, size.height

        try:
            while True:
                started = time.monotonic()
                with signals.waiting():
                    try:
                        snap, problem = fetch_status(endpoint, wait, keys=keys), ""
                    except BrokerUnavailable as exc:
                        problem = f"{exc}; retrying"
                drawn = draw()
                while (left := interval - (time.monotonic() - started)) > 0:
                    with signals.waiting():
                        time.sleep(min(left, RESIZE_CHECK))
                    if (console.size.width, console.size.height) != drawn:
                        # Lines drawn wider than the terminal now are wrapped (or cut) by it,
                        # which the in-place redraw cannot count: start from a clear screen.
                        console.clear()
                        drawn = draw()
        except Interrupted:
            pass


# ================================================================================= jobs
@cli.command()
@click.argument("job_id")
@configured("client", "broker")
@click.option("--broker", metavar="ENDPOINT", help="The broker's clients endpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def inspect(conf: ClientConfig, job_id: str, as_json: bool) -> None:
    """Show one job: state, attempts, workers tried, timings, last error."""
    from .client import Client

    _job_ids([job_id])
    with Client.from_config(conf) as client:
        info = client.query(job_id)
    if info is None:
        raise UnknownJob(f"the broker does not know job {job_id!r}")
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    from .status import render_job

    _console().print(render_job(info), soft_wrap=True)


@cli.command()
@click.argument("job_ids", nargs=-1, required=True, metavar="JOB_ID...")
@configured("client", "broker")
@click.option("--broker", metavar="ENDPOINT", help="The broker's clients endpoint.")
def cancel(conf: ClientConfig, job_ids: tuple[str, ...]) -> None:
    """Cancel jobs: queued ones never run; a running one's result is dropped."""
    from .client import Client

    missing = 0
    ids = _job_ids(job_ids)
    with Client.from_config(conf) as client:
        for job_id in ids:
            info = client.cancel(job_id)
            if info is None:
                missing += 1
                click.echo(f"{job_id}: unknown")
            else:
                click.echo(f"{job_id}: {info['state']}")
    if missing:
        sys.exit(RET_JOBS_FAILED)


_STATES = ("queued", "scheduled", "running", "done", "failed", "cancelled", "expired")


@cli.command()
@configured("client", "broker")
@click.option("--broker", metavar="ENDPOINT", help="The broker's clients endpoint.")
@click.option("--state", type=click.Choice(_STATES), help="Only jobs in this state.")
@click.option("--queue", metavar="NAME", help="Only jobs of this queue.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True,
              help="Most jobs to list.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per job.")
def jobs(conf: ClientConfig, state: str | None, queue: str | None, limit: int, as_json: bool) -> None:
    """List the jobs the broker holds, newest first: id, queue, state, tries, age, error."""
    from .client import Client
    from .status import render_jobs

    with Client.from_config(conf) as client:
        found = client.jobs(state=state, queue=queue, limit=limit)
    if as_json:
        for job in found:
            click.echo(json.dumps(job))
        return
    if not found:
        click.echo("no jobs" + (f" {state}" if state else "") + (f" in queue {queue!r}" if queue else ""),
                   err=True)
        return
    if sys.stdout.isatty():
        _console().print(render_jobs(found))
    else:  # a pipe: whole ids, columns apart by two spaces, nothing cut
        from .status import jobs_lines

        click.echo("\n".join(jobs_lines(found)))


@cli.command()
@click.argument("job_ids", nargs=-1, metavar="[JOB_ID...]")
@configured("client", "broker")
@click.option("--broker", metavar="ENDPOINT", help="The broker's clients endpoint.")
@click.option("--failed", "every", flag_value="failed",
              help="Every failed job the broker holds (with --queue: of that queue).")
@click.option("--expired", "every", flag_value="expired", help="Every expired job.")
@click.option("--cancelled", "every", flag_value="cancelled", help="Every cancelled job.")
@click.option("--queue", metavar="NAME", help="With --failed/--expired/--cancelled: only this queue.")
def requeue(conf: ClientConfig, job_ids: tuple[str, ...], every: str | None, queue: str | None) -> None:
    """Run failed, cancelled or expired jobs again, under the same ids, with fresh tries.

    Their earlier outcome stays in their history (rw inspect). Exits 1 if a job was
    unknown or could not be requeued.
    """
    from .client import Client

    if bool(job_ids) == bool(every):
        raise click.UsageError("give JOB_IDs or one of --failed, --expired, --cancelled")
    if queue is not None and not every:
        raise click.UsageError("--queue goes with --failed, --expired or --cancelled")
    ids = _job_ids(job_ids)
    with Client.from_config(conf) as client:
        if every:
            ids = [j["id"] for j in client.jobs(state=every, queue=queue, limit=10**9)]
            if not ids:
                click.echo(f"no {every} jobs" + (f" in queue {queue!r}" if queue else ""), err=True)
                return
        report = client.requeue(ids)
    done = report["requeued"]
    click.echo(f"requeued {len(done)} job{'' if len(done) == 1 else 's'}")
    for job_id in report["unknown"]:
        click.echo(f"{job_id}: unknown", err=True)
    for job_id, why in report["skipped"].items():
        click.echo(f"{job_id}: not requeued ({why})", err=True)
    if report["unknown"] or report["skipped"]:
        sys.exit(RET_JOBS_FAILED)


@cli.command()
@click.argument("queue")
@configured("client", "broker")
@click.option("--broker", metavar="ENDPOINT", help="The broker's clients endpoint.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation (for scripts).")
def purge(conf: ClientConfig, queue: str, yes: bool) -> None:
    """Cancel every job waiting in QUEUE (queued or scheduled); running ones go on."""
    from . import protocol
    from .client import Client

    try:
        protocol.check_queue(queue.encode())
    except ProtocolError as exc:
        raise click.BadParameter(exc.detail, param_hint="QUEUE") from None
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("purge asks for confirmation: give --yes when not at a terminal")
        click.confirm(f"Cancel every job waiting in queue {queue!r}?", abort=True, err=True)
    with Client.from_config(conf) as client:
        n = client.purge(queue)
    click.echo(f"cancelled {n} job{'' if n == 1 else 's'} waiting in queue {queue!r}")


def _queues(queues: tuple[str, ...]) -> list[str]:
    """Queue names without repeats, each checked before the broker is asked."""
    from . import protocol

    names = list(dict.fromkeys(queues))
    for name in names:
        try:
            protocol.check_queue(name.encode())
        except ProtocolError as exc:
            raise click.BadParameter(exc.detail, param_hint="QUEUE") from None
    return names


def _jobs(n: int) -> str:
    return f"{n} job{'' if n == 1 else 's'}"


@cli.command()
@click.argument("queues", nargs=-1, required=True, metavar="QUEUE...")
@configured("client", "broker")
@click.option("--broker", metavar="ENDPOINT", help="The broker's clients endpoint.")
def pause(conf: ClientConfig, queues: tuple[str, ...]) -> None:
    """Stop handing out jobs from QUEUE until `rw resume`, losing none.

    The queue still takes jobs and keeps them; scheduled jobs still come due and
    expiries still apply; running jobs finish. A worker serving other queues too
    still gets their jobs. Pausing survives a broker restart.
    """
    from .client import Client

    with Client.from_config(conf) as client:
        for name in _queues(queues):
            paused = client.pause(name)
            click.echo(f"paused queue {name!r}: {_jobs(paused.queued)} queued stay queued"
                       if paused.changed else
                       f"queue {name!r} was paused already ({_jobs(paused.queued)} queued)")


@cli.command()
@click.argument("queues", nargs=-1, required=True, metavar="QUEUE...")
@configured("client", "broker")
@click.option("--broker", metavar="ENDPOINT", help="The broker's clients endpoint.")
def resume(conf: ClientConfig, queues: tuple[str, ...]) -> None:
    """Hand out jobs from a paused QUEUE again (idle workers get them at once)."""
    from .client import Client

    with Client.from_config(conf) as client:
        for name in _queues(queues):
            resumed = client.resume(name)
            head = f"resumed queue {name!r}" if resumed.changed else f"queue {name!r} was not paused"
            click.echo(f"{head}: {_jobs(resumed.dispatched)} sent to idle workers, "
                       f"{resumed.queued} still queued")


@cli.command()
@click.argument("names", nargs=-1, metavar="[WORKER...]")
@configured("client", "broker")
@click.option("--broker", metavar="ENDPOINT", help="The broker's clients endpoint.")
@click.option("--host", "hosts", multiple=True, metavar="HOST",
              help="Every worker of this host (repeatable).")
@click.option("--all", "everyone", is_flag=True, help="Every registered worker.")
@click.option("--json", "as_json", is_flag=True, help="Print the broker's report as JSON.")
def drain(conf: ClientConfig, names: tuple[str, ...], hosts: tuple[str, ...], everyone: bool,
          as_json: bool) -> None:
    """Ask workers to finish their job in hand and leave (a warm stop, as SIGTERM).

    WORKER is a name as `rw status` shows it (host:pid). An idle worker leaves at
    once, a busy one once it has delivered its result; no job is lost and none is
    charged a try. A pool does not replace a drained process, and exits 0 once all
    its processes are drained. Exits 1 if a name or host matched no worker.
    """
    from .client import Client

    if everyone and (names or hosts):
        raise click.UsageError("--all drains every worker: give it without WORKER or --host")
    if not (everyone or names or hosts):
        raise click.UsageError("give WORKER names (as rw status shows them), --host HOST or --all")
    try:
        from . import protocol

        protocol.decode_client(protocol.encode_drain(names, hosts, everyone))
    except ProtocolError as exc:
        raise click.UsageError(exc.detail) from None
    with Client.from_config(conf) as client:
        report = client.drain(names, hosts=hosts, everyone=everyone)
    if as_json:
        click.echo(json.dumps(report))
    else:
        for w in report.get("asked", []):
            job = w.get("job")
            click.echo(f"{w.get('name')}: draining; " + (
                f"leaves once job {job} is done" if job else "idle, leaves now"))
        if everyone and not report.get("asked"):
            click.echo("no workers registered", err=True)
        for name in report.get("unknown", []):
            click.echo(f"{name}: no such worker or host", err=True)
    if report.get("unknown"):
        sys.exit(RET_JOBS_FAILED)


@cli.command()
@click.argument("name")
@click.option("-d", "--dir", "folder", default=".", show_default=True, metavar="DIR",
              help="Folder to write the two files into.")
def keygen(name: str, folder: str) -> None:
    """Write a CURVE key pair: NAME.key (public, to hand out) and NAME.key_secret (private).

    Put a client's NAME.key into the broker's client_keys folder, a worker's into
    worker_keys; give everyone the broker's broker.key as their broker_key.
    """
    from .security import keygen as make_keys

    public, secret = make_keys(name, folder)
    click.echo(f"public key: {public}\nsecret key: {secret} (keep it private; mode 600)")


def main(argv: list[str] | None = None) -> None:
    """Run ``rw``: every error respworkers raises on purpose ends here as one red line and
    its exit code from :data:`EXIT_CODES`. Click's own usage errors (unknown option,
    missing argument, bad option value) keep its "Usage: ..." message.
    """
    try:
        rv = cli.main(args=argv, prog_name="rw", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:  # Ctrl-C where a command does not handle it: as click does
        click.echo("Aborted!", err=True)
        sys.exit(1)
    except RespWorkersError as exc:
        click.secho(f"rw: {exc}", fg="red", err=True)
        sys.exit(exit_code(exc))
    sys.exit(rv if isinstance(rv, int) else RET_OK)
