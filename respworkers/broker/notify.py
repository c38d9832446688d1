"""Telling clients: who waits for which job, outcomes (batched per loop turn for clients
that batch), and confirmations (ACCEPTED) once the journal holds their submissions."""

from __future__ import annotations

from typing import Callable

from .. import protocol
from .model import DONE, EXPIRED, FAILED, Job, Waiter

SendFn = Callable[[bytes, list[bytes]], None]

#: Largest RESULTS message, in bytes of results (a single larger result travels alone).
MAX_RESULTS_BYTES = 256 << 10


class Notifier:
    def __init__(self, send: SendFn) -> None:
        self.send = send
        self.outbox: dict[bytes, list[Job]] = {}  # batched results waiting for the turn's end
        self.unconfirmed: list[tuple[bytes, bytes]] = []  # (client, job id) to confirm
        self.durable_replies: list[tuple[bytes, list[bytes]]] = []  # sent after the commit

    # ------------------------------------------------------------------ waiters
    @staticmethod
    def wait(job: Job, client: bytes, how: Waiter) -> None:
        """``client`` is told when ``job`` ends; once, however often it asks."""
        if all(waiter != client for waiter, _ in job.waiters):
            job.waiters += ((client, how),)

    @staticmethod
    def unwait(job: Job, client: bytes) -> None:
        if job.waiters:
            job.waiters = tuple(w for w in job.waiters if w[0] != client)

    def ended(self, job: Job) -> None:
        """Tell every waiter the outcome, once."""
        for client, how in job.waiters:
            self.tell(job, client, how)
        job.waiters = ()

    def tell(self, job: Job, client: bytes, how: Waiter) -> None:
        """Send an ended job's outcome to one client (batched results: at the turn's end)."""
        state = job.state
        if how is Waiter.BATCH and state is DONE:
            jobs = self.outbox.get(client)
            if jobs is None:
                self.outbox[client] = [job]
            else:
                jobs.append(job)
        elif how is Waiter.PLAIN:
            self.send(client, protocol.encode_plain_reply(job.result if state is DONE else None))
        elif state is DONE:
            self.send(client, protocol.encode_result(job.bid, job.result or [b""]))
        elif state is FAILED:
            self.send(client, protocol.encode_failed(job.bid, job.reason, job.error))
        elif state is EXPIRED:
            self.send(client, protocol.encode_expired(job.bid))
        else:
            self.send(client, protocol.encode_cancelled(job.bid))

    def send_results(self) -> None:
        """End of a loop turn: one RESULTS per client for its batched jobs that ended, in
        messages of at most MAX_RESULTS_BYTES (so a slow reader costs little)."""
        if not self.outbox:
            return
        for client, jobs in self.outbox.items():
            batch: list[tuple[bytes, list[bytes]]] = []
            size = 0
            for job in jobs:
                result = job.result or [b""]
                n = sum(map(len, result))
                if batch and size + n > MAX_RESULTS_BYTES:
                    self.send(client, protocol.encode_results(batch))
                    batch, size = [], 0
                batch.append((job.bid, result))
                size += n
            self.send(client, protocol.encode_results(batch))
        self.outbox.clear()

    # ------------------------------------------------------------------ confirmations
    def confirm_later(self, client: bytes, job: Job) -> None:
        """Confirm with the next commit (never before: ACCEPTED means journaled)."""
        self.unconfirmed.append((client, job.bid))

    def reply_when_durable(self, client: bytes, frames: list[bytes]) -> None:
        """A reply that says something was changed (REQUEUED): only once it is journaled."""
        self.durable_replies.append((client, frames))

    def send_accepted(self) -> None:
        """After a commit: one ACCEPTED per client, naming every job it confirms; then the
        replies that waited for the commit."""
        if self.durable_replies:
            for client, frames in self.durable_replies:
                self.send(client, frames)
            self.durable_replies.clear()
        if not self.unconfirmed:
            return
        batches: dict[bytes, list[bytes]] = {}
        for client, bid in self.unconfirmed:
            ids = batches.get(client)
            if ids is None:
                batches[client] = [bid]
            else:
                ids.append(bid)
        self.unconfirmed.clear()
        for client, ids in batches.items():
            self.send(client, protocol.encode_accepted(ids))
