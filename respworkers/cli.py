"""``rw``: the one command operators use. Thin: parse, resolve config once, call the library."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from . import __version__
from .config import Config, load
from .errors import (
    BrokerUnavailable,
    ConfigError,
    JobFileError,
    ProtocolError,
    RespWorkersError,
    TargetError,
)

#: Exit codes (also in the README).
RET_OK = 0
RET_JOBS_FAILED = 1
RET_USAGE = 2
RET_UNAVAILABLE = 3

#: Shortest refresh interval of the live status: anything less is a busy loop against the broker.
MIN_INTERVAL = 0.1

F = TypeVar("F", bound=Callable[..., Any])


def _config_option(fn: F) -> F:
    return click.option(
        "-c", "--config", "config_path", metavar="PATH", envvar=None,
        help="TOML config (default: $RW_CONFIG, else ./respworkers.toml, else built-in defaults).",
    )(fn)


def _load(config_path: str | None) -> Config:
    try:
        return load(config_path)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


def _override(cfg: Config, section: str, **flags: Any) -> Config:
    try:
        return cfg.override(section, **flags)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


def _keys(cfg: Config, section: str) -> Any:
    """The CURVE keys of a [client]/[worker] section (None without), or a usage error."""
    from .security import client_keys

    part = getattr(cfg, section)
    try:
        return client_keys(part.secret_key, part.broker_key, section)
    except ConfigError as exc:
        raise click.UsageError(f"{cfg.source}: {exc}") from None


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s [%(process)d] %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def _fail(message: str, code: int) -> None:
    click.secho(f"rw: {message}", fg="red", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rw")
def cli() -> None:
    """respworkers: a responsible ZeroMQ task broker and worker pool."""


# ================================================================================= broker
@cli.command()
@_config_option
@click.option("--clients", metavar="ENDPOINT", help="Endpoint clients submit to.")
@click.option("--workers", metavar="ENDPOINT", help="Endpoint workers connect to.")
@click.option("--status", metavar="ENDPOINT", help="Endpoint status queries go to.")
@click.option("--timeout", type=float, help="Default seconds one attempt may take.")
@click.option("--tries", type=int, help="Default attempts before a job fails.")
@click.option("--journal", metavar="PATH", help='sqlite journal file, or ":memory:".')
@click.option("--log-level", help="debug, info, warning or error.")
def broker(config_path: str | None, **flags: Any) -> None:
    """Run the broker until Ctrl-C or SIGTERM."""
    cfg = _override(_load(config_path), "broker", **flags)
    _logging(cfg.broker.log_level)
    from .broker.journal import JournalError
    from .broker.server import BindError, run_broker

    try:
        run_broker(cfg.broker)
    except (BindError, JournalError) as exc:
        _fail(str(exc), RET_USAGE)
    except ConfigError as exc:
        _fail(f"{cfg.source}: {exc}", RET_USAGE)


# ================================================================================= worker
@cli.command()
@click.argument("target")
@_config_option
@click.option("--broker", metavar="ENDPOINT", help="The broker's workers endpoint.")
@click.option("-n", "--processes", type=int, help="Number of worker processes.")
@click.option("-q", "--queue", "queues", multiple=True, metavar="NAME",
              help="Queue to serve (repeatable); overrides the class's `queues`.")
@click.option("--log-level", help="debug, info, warning or error.")
def worker(config_path: str | None, target: str, queues: tuple[str, ...], **flags: Any) -> None:
    """Run a pool of worker processes for TARGET (module:Class, a respworkers.Worker)."""
    cfg = _override(_load(config_path), "worker", queues=queues or None, **flags)
    _logging(cfg.worker.log_level)
    from .targets import import_target
    from .worker.pool import run_pool

    try:
        cls = import_target(target)
    except TargetError as exc:
        raise click.BadParameter(str(exc), param_hint="TARGET") from None
    _keys(cfg, "worker")  # a bad key fails here, not once per child process
    serve = cfg.worker.queues or tuple(cls.queues)
    try:
        serve = _override(cfg, "worker", queues=list(serve)).worker.queues
    except click.UsageError:
        raise click.BadParameter(f"{cls.__name__}.queues = {cls.queues!r} is not a list of queue "
                                 "names", param_hint="TARGET") from None
    logging.getLogger(__name__).info(
        "%d x %s serving %s, broker %s", cfg.worker.processes, target, ",".join(serve),
        cfg.worker.broker,
    )
    sys.exit(run_pool(target, cfg.worker, serve))


# ================================================================================= submit
@cli.command()
@click.argument("jobfile", required=False, metavar="JOBFILE")
@_config_option
@click.option("--broker", metavar="ENDPOINT", help="The broker's clients endpoint.")
@click.option("-p", "--payload", "payloads", multiple=True, metavar="TEXT",
              help="Submit TEXT as a job (repeatable), instead of or besides a job file.")
@click.option("--queue", help="Queue for jobs that name none.")
@click.option("--timeout", type=float, help="Time limit for jobs that set none.")
@click.option("--tries", type=int, help="Tries for jobs that set none.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per job.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--no-wait", is_flag=True,
              help="Print the job ids once the broker has them; fetch results with rw result.")
def submit(
    config_path: str | None, jobfile: str | None, broker: str | None,
    payloads: tuple[str, ...], queue: str | None, timeout: float | None, tries: int | None,
    as_json: bool, no_progress: bool, no_wait: bool,
) -> None:
    """Submit the jobs in JOBFILE ('-' for stdin), wait for and print their results.

    JOBFILE holds one JSON object, an array of them, or JSON Lines. Each job has a
    "payload" and optionally "id", "queue", "timeout" (seconds) and "tries".
    Exits 1 if any job failed.
    """
    from . import jobfile as jf
    from . import protocol
    from .client import new_job_id

    cfg = _override(_load(config_path), "client", broker=broker)
    if timeout is not None and not timeout > 0:
        raise click.BadParameter("must be > 0", param_hint="--timeout")
    if tries is not None and tries < 1:
        raise click.BadParameter("must be >= 1", param_hint="--tries")
    if queue is not None:
        try:
            protocol.check_queue(queue.encode())
        except RespWorkersError as exc:
            raise click.BadParameter(str(exc), param_hint="--queue") from None
    specs: list[jf.JobSpec] = [jf.JobSpec(p.encode()) for p in payloads]
    if jobfile is not None:
        try:
            if jobfile == "-":
                text, source = sys.stdin.read(), "<stdin>"
            else:
                with open(jobfile, encoding="utf-8") as fh:
                    text, source = fh.read(), jobfile
            specs.extend(jf.parse(text, source))
        except OSError as exc:
            _fail(f"cannot read {jobfile}: {exc.strerror or exc}", RET_USAGE)
        except UnicodeDecodeError as exc:
            _fail(f"{jobfile}: not UTF-8 text ({exc.reason})", RET_USAGE)
        except JobFileError as exc:
            _fail(f"{exc} (nothing was submitted)", RET_USAGE)
    if not specs:
        raise click.UsageError("give a JOBFILE ('-' for stdin) or --payload TEXT")

    client = _client(cfg)
    ids: list[str] = []
    try:
        jobs = [dict(payload=s.payload, id=s.id or new_job_id(),
                     queue=s.queue or queue or protocol.DEFAULT_QUEUE,
                     timeout=s.timeout if s.timeout is not None else timeout,
                     tries=s.tries if s.tries is not None else tries) for s in specs]
        for spec, job in zip(specs, jobs):  # all of them first: nothing or everything is sent
            try:
                client.validate(**job)
            except (ValueError, ProtocolError) as exc:
                where = f"{jobfile}: line {spec.line}: " if spec.line else ""
                _fail(f"{where}{exc} (nothing was submitted)", RET_USAGE)
        ids = client.submit_many(jobs)
        if no_wait:
            client.wait_confirmed(ids)
            for job_id in ids:
                click.echo(json.dumps({"id": job_id, "status": "accepted"}) if as_json else job_id)
            return
        outcomes = _collect(client, ids, no_progress)
    except BrokerUnavailable as exc:
        _fail(str(exc), RET_UNAVAILABLE)
    finally:
        client.close()
    if _print_outcomes(ids, outcomes, as_json):
        sys.exit(RET_JOBS_FAILED)


def _collect(client: Any, ids: list[str], no_progress: bool) -> dict[str, Any]:
    """Wait for every job's outcome, with a progress bar for batches on a terminal."""
    console_err = _console(stderr=True)
    show_bar = len(ids) > 1 and not no_progress and console_err.is_terminal
    outcomes: dict[str, Any] = {}
    failed = 0
    try:
        if show_bar:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            with Progress(TextColumn("jobs"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(),
                          console=console_err, transient=True) as bar:
                task = bar.add_task("jobs", total=len(ids), failed=0)
                client.on_event = lambda note: bar.console.print(f"[yellow]{note}")
                for r in client.results(ids):
                    outcomes[r.id] = r
                    failed += not r.ok
                    bar.update(task, advance=1, failed=failed)
        else:
            client.on_event = lambda note: console_err.print(f"[yellow]{note}")
            for r in client.results(ids):
                outcomes[r.id] = r
    except KeyboardInterrupt:
        console_err.print("interrupted; accepted jobs keep running on the broker. "
                          "Fetch them later with: rw result JOB_ID...")
        sys.exit(RET_OK)
    return outcomes


def _print_outcomes(ids: list[str], outcomes: dict[str, Any], as_json: bool) -> int:
    """Print one line per job in input order; return how many did not succeed."""
    from rich.text import Text

    out = _console()
    failed = 0
    for job_id in ids:
        r = outcomes[job_id]
        failed += not r.ok
        if as_json:
            click.echo(json.dumps(r.as_dict()))
        elif r.ok:
            body = b"".join(r.frames or []).decode("utf-8", "replace")
            out.print(Text.assemble(("✓", "green"), f" {job_id}  {body}"), soft_wrap=True)
        else:
            last = (r.error or "").strip().splitlines()
            out.print(Text.assemble(("✗", "red"), f" {job_id}  {r.status} ({r.reason})",
                                    f": {last[-1]}" if last else ""), soft_wrap=True)
    if failed and not as_json:
        _console(stderr=True).print(f"[red]{failed} of {len(ids)} jobs did not succeed")
    return failed


@cli.command()
@click.argument("job_ids", nargs=-1, required=True, metavar="JOB_ID...")
@_config_option
@click.option("--broker", metavar="ENDPOINT", help="The broker's clients endpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per job.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def result(config_path: str | None, job_ids: tuple[str, ...], broker: str | None, as_json: bool,
           no_progress: bool) -> None:
    """Wait for jobs submitted earlier (by anyone) and print their results."""
    ids = list(dict.fromkeys(job_ids))
    with _job_client(config_path, broker) as client:
        try:
            outcomes = _collect(client, ids, no_progress)
        except (BrokerUnavailable, RespWorkersError) as exc:
            _fail(str(exc), RET_UNAVAILABLE)
    if _print_outcomes(ids, outcomes, as_json):
        sys.exit(RET_JOBS_FAILED)


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr)


# ================================================================================= status
@cli.command()
@_config_option
@click.option("--status", metavar="ENDPOINT", help="The broker's status endpoint.")
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw snapshot as JSON and exit.")
@click.option("--interval", type=click.FloatRange(min=MIN_INTERVAL), default=1.0, show_default=True,
              help=f"Seconds between refreshes (at least {MIN_INTERVAL}).")
def status(config_path: str | None, status: str | None, once: bool, as_json: bool,
           interval: float) -> None:
    """Show the broker's state: a live table until Ctrl-C, or one snapshot."""
    from .client import fetch_status
    from .status import render, render_unreachable

    cfg = _override(_load(config_path), "client", status=status)
    endpoint, wait = cfg.client.status, cfg.client.request_timeout
    keys = _keys(cfg, "client")
    if as_json or once:
        try:
            snap = fetch_status(endpoint, wait, keys=keys)
        except BrokerUnavailable as exc:
            _fail(str(exc), RET_UNAVAILABLE)
        if as_json:
            click.echo(json.dumps(snap, indent=2))
        else:
            _console().print(render(snap))
        return
    from rich.live import Live

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(RET_OK))
    try:
        with Live(render_unreachable(f"asking {endpoint} ..."), console=_console(),
                  auto_refresh=False) as live:
            while True:
                started = time.monotonic()
                try:
                    live.update(render(fetch_status(endpoint, wait, keys=keys)), refresh=True)
                except BrokerUnavailable as exc:
                    live.update(render_unreachable(f"{exc}; retrying"), refresh=True)
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        pass


# ================================================================================= jobs
def _client(cfg: Config) -> Any:
    from .client import Client

    try:
        return Client.from_config(cfg.client)
    except ConfigError as exc:
        raise click.UsageError(f"{cfg.source}: {exc}") from None


def _job_client(config_path: str | None, broker: str | None) -> Any:
    return _client(_override(_load(config_path), "client", broker=broker))


@cli.command()
@click.argument("job_id")
@_config_option
@click.option("--broker", metavar="ENDPOINT", help="The broker's clients endpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def inspect(config_path: str | None, job_id: str, broker: str | None, as_json: bool) -> None:
    """Show one job: state, attempts, workers tried, timings, last error."""
    with _job_client(config_path, broker) as client:
        try:
            info = client.query(job_id)
        except (BrokerUnavailable, RespWorkersError) as exc:
            _fail(str(exc), RET_UNAVAILABLE)
    if info is None:
        _fail(f"the broker does not know job {job_id!r}", RET_JOBS_FAILED)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    from rich.table import Table

    table = Table(show_header=False, title=f"job {job_id}", title_justify="left")
    for key, value in info.items():
        if key in ("created", "started", "finished") and value:
            value = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
        table.add_row(key, "" if value is None else str(value))
    _console().print(table)


@cli.command()
@click.argument("job_ids", nargs=-1, required=True, metavar="JOB_ID...")
@_config_option
@click.option("--broker", metavar="ENDPOINT", help="The broker's clients endpoint.")
def cancel(config_path: str | None, job_ids: tuple[str, ...], broker: str | None) -> None:
    """Cancel jobs: queued ones never run; a running one's result is dropped."""
    missing = 0
    with _job_client(config_path, broker) as client:
        for job_id in job_ids:
            try:
                info = client.cancel(job_id)
            except (BrokerUnavailable, RespWorkersError) as exc:
                _fail(str(exc), RET_UNAVAILABLE)
            if info is None:
                missing += 1
                click.echo(f"{job_id}: unknown")
            else:
                click.echo(f"{job_id}: {info['state']}")
    if missing:
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

    try:
        public, secret = make_keys(name, folder)
    except ConfigError as exc:
        _fail(str(exc), RET_USAGE)
    click.echo(f"public key: {public}\nsecret key: {secret} (keep it private; mode 600)")


def main() -> None:
    cli()
