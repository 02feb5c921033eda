"""``Batcher``: a lone request runs at once, requests that arrive while the model works run together next (up
to ``max_batch_size``), a failure reaches every request of its batch, and a request whose caller left is skipped."""

from __future__ import annotations

import asyncio

import pytest

from mammo_ray.serving.batching import Batcher


class Model:
    """Records each batch; takes ``seconds`` per batch; fails a batch that holds ``bad``."""

    def __init__(self, seconds: float = 0.05, bad: int | None = None) -> None:
        self.seconds, self.bad, self.batches = seconds, bad, []

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(self.seconds)
        if self.bad in items:
            raise ValueError(f"item {self.bad} is bad")
        return [10 * item for item in items]


def test_a_lone_request_runs_at_once_and_requests_that_queued_meanwhile_run_as_one_batch():
    async def scenario():
        model = Model()
        batcher = Batcher(model, max_batch_size=4)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.01)  # the model is now working on [0] alone
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 7)]
        results = [await first] + [await task for task in rest]
        return model.batches, results, batcher

    batches, results, batcher = asyncio.run(scenario())
    assert batches == [[0], [1, 2, 3, 4], [5, 6]]  # formed when the model was free, each at most 4
    assert results == [0, 10, 20, 30, 40, 50, 60]  # each caller gets its own item's result
    assert (batcher.batches, batcher.requests) == (3, 7)


def test_a_batch_wait_lets_an_idle_model_gather_a_batch():
    async def scenario():
        model = Model(seconds=0.0)
        batcher = Batcher(model, max_batch_size=8, wait_s=0.05)
        tasks = [asyncio.create_task(batcher.submit(0))]
        await asyncio.sleep(0.01)
        tasks += [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
        return model.batches, await asyncio.gather(*tasks)

    batches, results = asyncio.run(scenario())
    assert batches == [[0, 1, 2]] and results == [0, 10, 20]


def test_a_failed_batch_fails_each_of_its_requests_and_the_next_batch_still_runs():
    async def scenario():
        model = Model(bad=2)
        batcher = Batcher(model, max_batch_size=2)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.01)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in (1, 2, 3)]
        outcomes = await asyncio.gather(first, *tasks, return_exceptions=True)
        return model.batches, outcomes

    batches, outcomes = asyncio.run(scenario())
    assert batches == [[0], [1, 2], [3]]
    assert outcomes[0] == 0 and outcomes[3] == 30
    for failed in outcomes[1:3]:
        assert isinstance(failed, ValueError) and "item 2 is bad" in str(failed)


def test_a_request_whose_caller_left_is_not_run():
    async def scenario():
        model = Model()
        batcher = Batcher(model, max_batch_size=8)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(batcher.submit(1))
        kept = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0.01)
        gone.cancel()  # a client that disconnected while the model worked
        return model.batches, await first, await kept, gone.cancelled()

    batches, first, kept, cancelled = asyncio.run(scenario())
    assert batches == [[0], [2]] and (first, kept, cancelled) == (0, 20, True)


def test_a_batch_function_that_returns_the_wrong_count_fails_its_requests():
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    async def scenario():
        return await Batcher(short).submit(1)

    with pytest.raises(RuntimeError, match="returned 0 results for 1 items"):
        asyncio.run(scenario())
