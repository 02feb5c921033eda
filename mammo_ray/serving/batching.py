"""Request batching for the model replica: requests wait while the model works, and it takes them all at once.

Ray Serve's ``@serve.batch`` forms a batch as soon as requests arrive, and only then waits for the model
(``_process_batches``: ``wait_for_batch``, then a task that waits on the ``max_concurrent_batches``
semaphore). With no batch wait, each batch is whatever arrived in that instant: under 16 concurrent
clients its batches held 1.7 requests on average while requests queued for 200 ms behind them
(benchmarks/README.md). With a batch wait, a lone request pays the wait. Here a batch is formed when the
model is free: a request that finds it idle runs at once (after ``wait_s``, if set, for others to join),
and the requests that arrive while it works run together next, up to ``max_batch_size``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """``await batcher.submit(item)`` runs ``run`` on a batch of items (one batch at a time) and returns this
    item's result. ``run`` returns one result per item, in order. An exception from ``run`` is every
    waiting request's; a request whose caller went away (cancelled) is left out of the next batch."""

    def __init__(
        self, run: Callable[[list[Item]], Awaitable[Sequence[Result]]], max_batch_size: int = 8, wait_s: float = 0.0
    ) -> None:
        self.run = run
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s  # how long an idle model waits for a batch to fill after its first request
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0  # batches run, and the requests in them: what a replica reports
        self.requests = 0

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        if self.wait_s > 0 and len(self._pending) < self.max_batch_size:
            await asyncio.sleep(self.wait_s)
        while True:
            self._pending = [(item, future) for item, future in self._pending if not future.done()]  # callers gone
            if not self._pending:
                return
            batch, self._pending = self._pending[: self.max_batch_size], self._pending[self.max_batch_size :]
            self.batches += 1
            self.requests += len(batch)
            try:
                results: Sequence[Any] = await self.run([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} items")
            except Exception as exc:  # noqa: BLE001 - the batch's failure is each of its requests'
                self._fail(batch, exc)
                continue
            except BaseException:  # this task cancelled (the replica stops): nobody is left waiting forever
                self._fail(batch + self._pending, RuntimeError("the batch was cancelled: the replica is stopping"))
                self._pending = []
                raise
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    @staticmethod
    def _fail(batch: list[tuple[Item, asyncio.Future[Result]]], exc: BaseException) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)
