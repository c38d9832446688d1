"""The class users derive from. The library does all the messaging around it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, ClassVar, NamedTuple, Optional


class JobContext(NamedTuple):
    """What the worker knows about the job in hand (``self.job`` inside ``process``)."""

    id: str
    attempt: int  #: 1 for the first try
    timeout: float  #: seconds; the soft time limit (TimeLimit is raised then)
    queue: str
    priority: int
    tries: int  #: how many attempts the job may have in all
    created: float  #: when the broker accepted the job (epoch seconds)

    @property
    def last_try(self) -> bool:
        """Whether a failure now fails the job (no tries left)."""
        return self.attempt >= self.tries


class JobOutcome(NamedTuple):
    """How an attempt ended, for :meth:`Worker.after_job`."""

    #: ``done``; ``error`` (an exception: the broker retries it while tries are left);
    #: ``retry`` (``Retry``); ``fail`` (``Fail``); ``cancelled`` (the job ended elsewhere
    #: and ``Cancelled`` stopped it); ``time-limit`` (``TimeLimit``).
    status: str
    exception: BaseException | None
    seconds: float  #: how long ``process`` ran


ProgressSink = Callable[[Optional[float], Optional[str], dict[str, Any]], None]


class Worker:
    """Derive from this and override :meth:`process` or :meth:`process_multipart`.

    One instance lives in each worker process and handles one job at a time, so
    instance attributes set in :meth:`setup` (a model, a connection) are reused
    across jobs. An exception raised by ``process`` fails this try of the job and
    its traceback reaches the broker and, after the last try, the client.
    """

    #: Queues this worker serves; ``rw worker --queue`` or ``[worker] queues`` override it.
    queues: ClassVar[Sequence[str]] = ("default",)

    #: Delay before the first retry of a job that failed on this worker class, then
    #: doubling up to ``backoff_max`` (seconds; None: the job's or the broker's). Sent to
    #: the broker when the worker registers.
    backoff: ClassVar[float | None] = None
    backoff_max: ClassVar[float | None] = None

    #: At a job's time limit the broker gives it to another worker and, with this True,
    #: ``process`` gets TimeLimit (clean up and stop). False lets the job run on, so that
    #: its late answer may still win, until the hard limit (twice the limit plus 5 s).
    soft_time_limit: ClassVar[bool] = True

    #: Jobs a worker process may hold at once: 1 is strict on demand (the next job is sent
    #: when the answer arrives). More lets the broker send several in one message and the
    #: worker answer several in one: for many tiny jobs (a millisecond or less). A job held
    #: waits behind the one running, so keep 1 for long or uneven jobs (README: Prefetch).
    #: ``rw worker --prefetch N`` or ``[worker] prefetch`` override it.
    prefetch: ClassVar[int] = 1

    #: Prefetch: once the running job has run this many seconds, the jobs held behind it
    #: are given back to the broker (uncharged, first in their queue) for idle workers to
    #: take, instead of waiting for it. Raise it for jobs that often take longer than this.
    prefetch_patience: ClassVar[float] = 0.02

    #: Set while a job runs.
    job: JobContext | None = None
    _progress_sink: ProgressSink | None = None

    def setup(self) -> None:
        """Called once in the worker process before the first job."""

    def teardown(self) -> None:
        """Called once when the worker process stops cleanly (a warm stop, a recycle)."""

    # Hooks around each attempt, called in the worker process, in the job's thread. An
    # exception in ``before_job`` fails the attempt as one in ``process`` would; one in
    # ``after_job`` or ``on_failure`` is logged and changes nothing (the outcome stands).
    # The answer leaves after them, so keep them quick.
    def before_job(self, job: JobContext) -> None:
        """Before ``process``: open a tracing span, bind log context, reset a metric."""

    def on_failure(self, job: JobContext, exc: BaseException) -> None:
        """``process`` (or ``before_job``) raised ``exc`` (not ``Cancelled``): report it."""

    def after_job(self, job: JobContext, outcome: JobOutcome) -> None:
        """After every attempt, whatever its outcome."""

    def progress(self, fraction: float | None = None, message: str | None = None,
                 **meta: Any) -> None:
        """Tell the broker how far the job in hand got (``rw inspect``, ``rw status``,
        ``Client.watch``). Cheap to call often: the latest report is sent at most a few
        times a second. ``fraction`` is 0..1; ``meta`` must be JSON (4 KB in all)."""
        sink = self._progress_sink
        if sink is not None:
            sink(fraction, message, meta)

    def process(self, payload: bytes) -> bytes:
        """Turn one job payload into one result."""
        raise NotImplementedError(f"{type(self).__name__} must override process()")

    def process_multipart(self, frames: list[bytes]) -> list[bytes]:
        """Turn a multi-frame job into result frames. By default: one frame to ``process``."""
        if len(frames) != 1:
            raise TypeError(
                f"{type(self).__name__}.process takes one frame, this job has {len(frames)}; "
                "override process_multipart to take several"
            )
        return [self.process(frames[0])]

    @classmethod
    def overrides_processing(cls) -> bool:
        return cls.process is not Worker.process or cls.process_multipart is not Worker.process_multipart
