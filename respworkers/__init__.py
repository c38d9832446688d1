"""respworkers: a responsible ZeroMQ task broker and worker pool.

Public names: :class:`Worker` (derive and override ``process``), :class:`Client`
(submit jobs and wait for results; one thread at a time), :class:`ThreadSafeClient`
(the same, shared by threads), and the errors in :mod:`respworkers.errors`. The asyncio
client is :class:`respworkers.aio.Client`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .client import Client, JobResult, ThreadSafeClient
from .errors import (
    BrokerUnavailable,
    Cancelled,
    ClientClosed,
    ConfigError,
    Fail,
    Interrupt,
    InvalidArgument,
    InvalidType,
    JobFailed,
    ProtocolError,
    Refused,
    RespWorkersError,
    Retry,
    TimeLimit,
)
from .worker.base import JobContext, JobOutcome, Worker

__all__ = [
    "BrokerUnavailable",
    "Cancelled",
    "Client",
    "ClientClosed",
    "ConfigError",
    "Fail",
    "Interrupt",
    "JobContext",
    "InvalidArgument",
    "InvalidType",
    "JobFailed",
    "JobOutcome",
    "JobResult",
    "ProtocolError",
    "Refused",
    "RespWorkersError",
    "Retry",
    "ThreadSafeClient",
    "TimeLimit",
    "Worker",
    "__version__",
]
