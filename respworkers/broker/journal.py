"""Where the broker records jobs so that nothing confirmed is lost.

The core calls these verbs; implementations decide how durable they are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core import Job


class Journal:
    """The verbs the core uses. Writes may be buffered until :meth:`commit`."""

    def submitted(self, job: Job) -> None: ...

    def attempted(self, job: Job) -> None: ...

    def finished(self, job: Job) -> None: ...

    def commit(self) -> None: ...

    def expire(self, horizon: float) -> None: ...

    def close(self) -> None: ...

    def describe(self) -> dict[str, Any]:
        return {"kind": "none"}


class NullJournal(Journal):
    """Keeps nothing: jobs live only in the broker's memory."""
