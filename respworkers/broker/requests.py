"""What a client asks of the broker, routed: submissions go to the core's transitions,
questions (QUERY, WAIT, WATCH), CANCEL and the operators' requests (JOBS, REQUEUE, PURGE,
PAUSE, RESUME, DRAIN) are answered here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import protocol
from ..errors import ProtocolError
from . import admin
from .model import (
    CANCELLED,
    ENDED,
    Job,
    Waiter,
)
from .notify import Notifier

if TYPE_CHECKING:
    from .core import BrokerCore

PROTO, PLAIN, BATCH = Waiter.PROTO, Waiter.PLAIN, Waiter.BATCH


def handle(core: BrokerCore, client: bytes, frames: list[bytes]) -> None:
    try:
        req = protocol.decode_client(frames)
    except ProtocolError as exc:
        core.count_bad("clients", exc)
        if frames and not frames[0]:  # a REQ envelope: the plain failure reply
            core.send_client(client, protocol.encode_plain_reply(None))
        elif frames:
            core.send_client(client, protocol.encode_invalid(str(exc)))
        return
    if isinstance(req, protocol.Submit):
        core.submit(client, req, PROTO)
    elif isinstance(req, protocol.SubmitMany):
        core._take_in(client, req.jobs, 0)
    elif isinstance(req, protocol.Plain):
        # Unguessable, so no other client can WAIT for, QUERY or CANCEL it by guessing.
        job_id = "req-" + core.tokens.next().decode()
        core.submit(client, protocol.Submit(job_id, protocol.DEFAULT_QUEUE,
                                            protocol.NO_OPTIONS, req.payload), PLAIN)
    elif isinstance(req, protocol.Query):
        inform(core, client, req.job_id)
    elif isinstance(req, protocol.Cancel):
        job = core.jobs.get(req.job_id)
        if job is not None:
            cancel(core, job)
        inform(core, client, req.job_id)
    elif isinstance(req, protocol.Wait):
        # Many ids (a client catching up): outcomes batched like those of SUBMITS.
        how = PROTO if len(req.job_ids) == 1 else BATCH
        for job_id in req.job_ids:
            wait(core, client, job_id, how)
    elif isinstance(req, protocol.Unwait):
        for job_id in req.job_ids:
            job = core.jobs.get(job_id)
            if job is not None:
                Notifier.unwait(job, client)
                if job.watchers and client in job.watchers:
                    job.watchers.remove(client)
    elif isinstance(req, protocol.Watch):
        watch(core, client, req.job_id)
    elif isinstance(req, protocol.ListJobs):
        core.send_client(client, protocol.encode_jobs_page(admin.list_jobs(core, req.query)))
    elif isinstance(req, protocol.Requeue):
        # Told only once journaled, as ACCEPTED is; refused while the journal fails.
        report = admin.requeue(core, req.job_ids)
        if report["requeued"]:
            core.notifier.reply_when_durable(client, protocol.encode_requeued(report))
        else:
            core.send_client(client, protocol.encode_requeued(report))
    elif isinstance(req, protocol.Purge):
        cancelled, left = admin.purge(core, req.queue)
        core.send_client(client, protocol.encode_purged(req.queue, cancelled, left))
    elif isinstance(req, (protocol.Pause, protocol.Resume)):
        pause_or_resume(core, client, req)
    elif isinstance(req, protocol.Drain):
        core.send_client(client, protocol.encode_draining(admin.drain(core, req)))
    else:
        core.send_client(client, protocol.encode_pong(core.broker_id, core.limits))


def pause_or_resume(core: BrokerCore, client: bytes, req: protocol.Pause | protocol.Resume) -> None:
    """``rw pause``/``rw resume``: in effect at once; a change is told once journaled (it
    survives a restart), as REQUEUED is."""
    if isinstance(req, protocol.Pause):
        if req.queue not in core.queues.paused and len(core.queues.paused) >= admin.MAX_PAUSED:
            exc = ProtocolError("too many paused queues",
                                f"{admin.MAX_PAUSED} are paused; resume some first")
            core.count_bad("clients", exc)
            core.send_client(client, protocol.encode_invalid(str(exc)))
            return
        queued, changed = admin.pause(core, req.queue)
        frames = protocol.encode_paused(req.queue, queued, changed)
    else:
        dispatched, queued, changed = admin.resume(core, req.queue)
        frames = protocol.encode_resumed(req.queue, dispatched, queued, changed)
    if changed:
        core.notifier.reply_when_durable(client, frames)
    else:
        core.send_client(client, frames)


def inform(core: BrokerCore, client: bytes, job_id: str) -> None:
    job = core.jobs.get(job_id)
    if job is None:
        core.send_client(client, protocol.encode_unknown(job_id))
    else:
        core.send_client(client, protocol.encode_info(job_id, job.info(core.wall)))


def wait(core: BrokerCore, client: bytes, job_id: str, how: Waiter) -> None:
    job = core.jobs.get(job_id)
    if job is None:
        core.send_client(client, protocol.encode_unknown(job_id))
    elif job.state in ENDED:
        core.notifier.tell(job, client, how)
    else:
        Notifier.wait(job, client, how)


def watch(core: BrokerCore, client: bytes, job_id: str) -> None:
    """Send ``client`` the job's progress: what is known now, then each change."""
    job = core.jobs.get(job_id)
    if job is None:
        core.send_client(client, protocol.encode_unknown(job_id))
        return
    if job.state not in ENDED:
        if job.watchers is None:
            job.watchers = [client]
        elif client not in job.watchers:
            job.watchers.append(client)
    if job.progress is not None:
        core.send_client(client, protocol.encode_progress(job.bid, job.progress))


def cancel(core: BrokerCore, job: Job) -> None:
    """A waiting or running job ends cancelled; its running attempts are told to stop."""
    if job.state in ENDED:
        return
    core._unwait(job)
    if core.unstarted(job):
        core.uncharge(job)
    core.finish(job, CANCELLED, protocol.FAIL_CANCELLED, "cancelled by a client")
