"""The class users derive from. The library does all the messaging around it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, NamedTuple


class JobContext(NamedTuple):
    """What the worker knows about the job in hand (``self.job`` inside ``process``)."""

    id: str
    attempt: int
    timeout: float


class Worker:
    """Derive from this and override :meth:`process` or :meth:`process_multipart`.

    One instance lives in each worker process and handles one job at a time, so
    instance attributes set in :meth:`setup` (a model, a connection) are reused
    across jobs. An exception raised by ``process`` fails this try of the job and
    its traceback reaches the broker and, after the last try, the client.
    """

    #: Queues this worker serves; ``rw worker --queue`` or ``[worker] queues`` override it.
    queues: ClassVar[Sequence[str]] = ("default",)

    #: Set while a job runs.
    job: JobContext | None = None

    def setup(self) -> None:
        """Called once in the worker process before the first job."""

    def teardown(self) -> None:
        """Called once when the worker process stops cleanly."""

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
