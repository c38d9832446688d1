"""Workers coming and going: registration (HELLO, with a job in hand or not), a pool's
VACATE, a revoked key, a goodbye, a drain. Each changes the worker registry and may give
a job back to its queue; the job transitions themselves stay in the core."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from .. import protocol
from ..errors import ProtocolError
from . import trace
from .model import (
    ENDED,
    RUNNING,
    WAITING,
)
from .workers import WorkerRec

if TYPE_CHECKING:
    from .core import BrokerCore


#: Longest heartbeat interval a worker may announce (seconds).
MAX_WORKER_HEARTBEAT = 60.0


def hello(core: BrokerCore, wid: bytes, msg: protocol.Hello) -> None:
    """Register a worker; then it is ready, or it holds the job it names (10.4)."""
    w = WorkerRec(wid, msg.queues, msg.info, core.now)
    if msg.prefetch > 1:  # checked by the decoder: 1..MAX_PREFETCH
        w.prefetch = msg.prefetch
        w.held = deque()
    beat = msg.info.get("heartbeat")
    if isinstance(beat, bool) or not isinstance(beat, (int, float)):
        beat = 0.0
    # A worker may beat more slowly than the broker, within reason.
    w.expiry = min(max(core.cfg.heartbeat, beat), MAX_WORKER_HEARTBEAT) * core.cfg.liveness
    if w.slot is not None:
        # A restarted pool child replaces its dead predecessor at once (its attempt
        # failed: a crash counts as a try); the same process on a new socket keeps its
        # attempt. Slots are secret, so only a pool's own processes can do either.
        old = core.workers.in_slot(w.slot)
        if old is not None and old.wid != wid:
            if old.stale(w):  # the process is registered on a newer connection
                core.count_bad("workers", ProtocolError(
                    "HELLO from a connection the worker has left", w.name))
                core.send_worker(wid, protocol.encode_disconnect("stale HELLO"))
                return
            supersede(core, old, msg, "was replaced by a new process")
    core.workers.add(w)
    core.send_worker(wid, core._welcome)
    if msg.job_id is None:
        if not w.draining:  # a drained worker that reconnected: it is about to say BYE
            core._ready(w)
        return
    w.job_id, w.attempt, w.token = msg.job_id, msg.attempt, msg.token
    core.holders[msg.token] = w
    job = core.jobs.get(msg.job_id)
    if job is None or job.state in ENDED:
        # Over while it was away: it stops now; an answer it sends anyway is dropped.
        core.counters.abandoned += 1
        core.send_worker(wid, protocol.encode_abandon(
            msg.job_id.encode(), msg.attempt, job.state.value if job else "unknown"))
        if core._debug:
            trace.abandoned(msg.job_id, msg.attempt, w, job.state.value if job else "unknown")
        return
    if job.tokens is None or job.tokens.get(msg.token) != msg.attempt:
        # Not an attempt this broker (or its journal) sent: a forgery, or a dispatch that
        # a broker crash kept out of the journal. Its answer will be dropped.
        core.count_bad("workers", ProtocolError(
            "HELLO claiming an attempt with a wrong token", msg.job_id))
        w.forged = True
        return
    w.job = job
    if job.state is RUNNING and not core.workers.registered(job.worker):
        job.worker = w  # the same process, reconnected with its job in hand
    elif job.state in WAITING:
        core._unwait(job)
        job.attempt = max(job.attempt, msg.attempt)
        job.state = RUNNING
        job.worker = w
        core.deadlines.start(job, core.now)
        if not job.tried or job.tried[-1] != w.name:
            job.tried += (w.name,)
        core.journal.attempted(job)
        if core._debug:
            trace.claimed(job, w)


def supersede(core: BrokerCore, old: WorkerRec, msg: protocol.Hello, why: str) -> None:
    """Drop a record a new HELLO replaces. If the HELLO claims the very attempt the old
    record holds, the attempt moves to the new record instead of failing."""
    if msg.job_id is not None and old.holds(msg.job_id, msg.attempt, msg.token):
        old.release()
    drop(core, old, why)


def vacate(core: BrokerCore, slot: str, incarnation: str | None = None) -> None:
    """A pool saw the process in ``slot`` die: fail its attempt now, not at heartbeat
    expiry. A VACATE naming another process than the slot's (it was delayed, and the
    pool's new process has registered since) changes nothing."""
    w = core.workers.in_slot(slot)
    if w is not None and (incarnation is None or w.incarnation in (None, incarnation)):
        core.counters.lost_workers += 1
        drop(core, w, "died (its pool saw it exit)")


def revoke(core: BrokerCore, wid: bytes) -> None:
    """Its key was revoked: forget it now. Its job goes back to the queue, uncharged
    (the job is not at fault), and nothing it sends is listened to any more."""
    w = core.workers.get(wid)
    if w is not None:
        core.give_back(w)
        drop(core, w, "had its key revoked")


def drop(core: BrokerCore, w: WorkerRec, why: str) -> None:
    """Forget a worker; its current attempt, if any, failed (a crash counts as a try).

    The attempt's token stays valid: a worker that comes back with it (HELLO naming
    the job) may still deliver its answer while the job is unfinished.
    """
    if not core.workers.remove(w):
        return
    if core.holders.get(w.token) is w:
        del core.holders[w.token]  # the token stays valid (in job.tokens) for a comeback
    if w.held:
        core.withdraw_held(w)  # before the running one, which then goes first
    job = w.job
    if job is not None and job.state is RUNNING and job.worker is w:
        core.attempt_failed(
            job, protocol.FAIL_LOST, f"worker {w.name} {why} while running attempt {w.attempt}",
            w)
    w.job = None


def drain(core: BrokerCore, w: WorkerRec) -> None:
    """``rw drain``: the worker finishes the job in hand and leaves (an idle one at once).
    It is sent no job from now on; DRAIN is sent again if asked again (harmless)."""
    if not w.draining:
        w.draining = True
        core.counters.drained += 1
    if w.ready:
        core.workers.unready(w)
    core.send_worker(w.wid, protocol.DRAIN_FRAMES)
