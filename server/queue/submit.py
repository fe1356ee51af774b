"""The API's use of any ``JobQueue``: await a job it admitted, withdraw it, and answer every waiting job when
no worker is left to run them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ..errors import DarkroomError, DeadlineExceeded, ServiceUnavailable
from ..jobs import ClientGone, Job, JobResult, JobState
from .protocol import JobQueue


async def await_job(
    queue: JobQueue,
    job: Job,
    is_disconnected: Callable[[], Awaitable[bool]],
    poll_s: float = 0.25,
) -> JobResult:
    """Wait for a job the caller has admitted (``await queue.admit(job)``: ``QueueFull``, 503), withdrawing
    it if its deadline passes or the client leaves before it starts.

    Raises ``DeadlineExceeded``, ``ClientGone`` or the job's own error.
    """
    waiter = asyncio.wrap_future(job.future)
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=poll_s)
            if done:
                return waiter.result()
            if job.state is not JobState.QUEUED:
                continue  # running: it finishes whatever the client does
            if job.expired():
                await withdraw(queue, job, DeadlineExceeded(
                    "the job did not start before its deadline; the server is overloaded"
                ))
            elif await is_disconnected():
                await withdraw(queue, job, ClientGone(job.id))
    finally:
        if not waiter.done():
            await withdraw(queue, job, ClientGone(job.id))


async def withdraw(queue: JobQueue, job: Job, error: DarkroomError | ClientGone) -> None:
    """Withdraw a job that has not started, answering it with ``error``.

    A queue whose workers live in other processes (Redis) must first take the job back from them; one a
    worker has started meanwhile is left to finish, as a running local job is.
    """
    if not await queue.reserve_withdrawal(job):
        job.try_start()
        return
    if job.withdraw(error):
        await queue.remove(job)


def fail_waiting(queue: JobQueue, reason: str) -> None:
    """When no worker can run anything, answer every waiting job instead of letting it hang."""
    for job in queue.drain():
        job.fail(ServiceUnavailable(f"no worker can run jobs: {reason}"))
