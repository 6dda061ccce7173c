"""An executor for per-item functions that wait on the network: ``async def process(row, state)``.

It satisfies the runner's ``Executor`` protocol: ``run(stage, items)`` yields ``(index, outcome)``
as items finish, in any order, with the outcomes ``pipeline.runner.run_item`` would give. Up to
``concurrency`` items are in flight at once, on one event loop in the calling thread; the loop runs
while the runner waits for the next outcome, so no thread or process is started.

Two exceptions from the per-item function have a meaning of their own:

- ``Deferred``: the item is left for a later run (the cost cap is reached, or its batch reply has
  not arrived); no outcome is yielded, so the runner neither records it as done nor as failed.
  ``deferred`` counts them by reason.
- ``StageConfigError`` (e.g. the server refused the API key): the run stops; items in flight are
  cancelled and the error propagates to the caller. Finished items stay in the runner's ledger.

``stage.setup(settings)`` gives the per-item state, as for the other executors; when the state
has an ``aclose()`` coroutine it is awaited at the end. ``redact``, when given, is applied to the
reason and traceback of every failed outcome.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, Callable, Iterator

from pipeline.errors import PipelineError
from pipeline.instructions.chat import ClientSettings
from pipeline.runner import Stage, StageConfigError, run_item


class Deferred(PipelineError):
    """Leave this item for a later run: no outcome is recorded for it now."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(message or reason)
        self.reason = reason


async def run_item_async(process: Callable, row: dict, state: Any) -> dict:
    """``run_item`` for an async per-item function (same outcomes; Deferred and
    StageConfigError propagate)."""
    try:
        result = await process(row, state)
    except (Deferred, StageConfigError):
        raise
    except Exception as exc:
        failure = exc

        def reraise(_row, _state):
            raise failure

        return run_item(reraise, row, state)
    return run_item(lambda _row, _state: result, row, state)


class AsyncExecutor:
    def __init__(self, concurrency: int = ClientSettings.concurrency, redact: Callable[[str], str] | None = None):
        if concurrency < 1:
            raise StageConfigError(f"--concurrency must be at least 1, got {concurrency}")
        self.concurrency = concurrency
        self.workers = concurrency  # what the runner reports as its parallelism
        self.redact = redact
        self.deferred: Counter = Counter()

    def run(self, stage: Stage, items: list[tuple[int, dict]]) -> Iterator[tuple[int, dict]]:
        loop = asyncio.new_event_loop()
        finished: asyncio.Queue = asyncio.Queue()
        running: set[asyncio.Task] = set()
        stop = asyncio.Event()
        state = None

        async def one(index: int, row: dict, slots: asyncio.Semaphore) -> None:
            try:
                await finished.put(("outcome", index, await run_item_async(stage.process, row, state)))
            except Deferred as exc:
                await finished.put(("deferred", index, exc.reason))
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # StageConfigError: the run must stop
                stop.set()
                await finished.put(("fatal", index, exc))
            finally:
                slots.release()

        async def feed() -> None:
            # A slot is given to the next item as soon as one finishes, inside the loop, so that
            # items do not move in lockstep with the runner's consumption of outcomes.
            slots = asyncio.Semaphore(self.concurrency)
            for index, row in items:
                await slots.acquire()
                if stop.is_set():
                    break
                task = asyncio.ensure_future(one(index, row, slots))
                running.add(task)
                task.add_done_callback(running.discard)
            while running:
                await asyncio.wait(set(running))
            await finished.put(("end", -1, None))

        async def next_batch() -> list:
            batch = [await finished.get()]
            while not finished.empty():
                batch.append(finished.get_nowait())
            return batch

        feeder = None
        try:
            state = stage.setup(stage.settings) if stage.setup else stage.settings
            feeder = loop.create_task(feed())
            done = False
            while not done:
                for kind, index, payload in loop.run_until_complete(next_batch()):
                    if kind == "outcome":
                        yield index, self._redacted(payload)
                    elif kind == "deferred":
                        self.deferred[payload] += 1
                    elif kind == "fatal":
                        raise payload
                    else:
                        done = True
        finally:
            stop.set()
            pending = [t for t in (*running, feeder) if t is not None and not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            if state is not None and hasattr(state, "aclose"):
                loop.run_until_complete(state.aclose())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _redacted(self, outcome: dict) -> dict:
        if self.redact is None or outcome.get("ok"):
            return outcome
        return {k: self.redact(v) if k in ("reason", "traceback") and isinstance(v, str) else v for k, v in outcome.items()}
