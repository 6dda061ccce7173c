"""Executors: where a stage's items run. ``LocalExecutor`` (spawned worker processes on this
machine, the default), ``InlineExecutor`` (this process, for debugging) and, in
``pipeline.ray_executor``, Ray. They only see a ``Stage`` and ``(index, row)`` pairs and yield
``(index, outcome)`` as items finish; the runner keeps the order, the ledger and the error records."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
from typing import Any, Iterator, Protocol

from pipeline.errors import RunAborted, StageConfigError
from pipeline.stage import Stage, run_batch, run_item
from pipeline.worker_lifetime import exit_with_parent

log = logging.getLogger("llark")

THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)


class Executor(Protocol):
    """Runs a stage's per-item function over ``(index, row)`` pairs, yielding ``(index, outcome)``
    as items finish, in any order. Outcomes are what ``run_item`` returns. A batched stage's items
    go to ``run_batch`` in the runs ``Stage.chunks`` cuts, and come back one outcome per item."""

    workers: int

    def run(self, stage: Stage, items: list[tuple[int, dict]]) -> Iterator[tuple[int, dict]]: ...


_WORKER_STATE: Any = None
_WORKER_STAGE: Stage | None = None


def _init_worker(stage: Stage) -> None:
    global _WORKER_STATE, _WORKER_STAGE
    exit_with_parent()  # before setup, which may take long (models): a killed runner takes its workers along
    _WORKER_STAGE = stage
    _WORKER_STATE = stage.setup(stage.settings) if stage.setup else stage.settings


def _run_in_worker(row: dict) -> dict:
    return run_item(_WORKER_STAGE.process, row, _WORKER_STATE)


def _run_batch_in_worker(rows: list[dict]) -> list[dict]:
    return run_batch(_WORKER_STAGE, rows, _WORKER_STATE)


def _worker_ready() -> bool:
    return True


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class LocalExecutor:
    """Worker processes on this machine (``spawn``ed, one BLAS/OpenMP thread each).

    Workers receive one item at a time, or one batch of a batched stage; ``max_in_flight`` counts
    those (default: two per worker). A worker that dies (a segfault in native code, the OOM killer)
    breaks the pool; the items that were in flight, batches included, are then rerun one at a time
    in a one-worker pool, so the one that kills its worker again is recorded as ``worker_crashed``
    and the others finish normally.
    """

    def __init__(self, workers: int | None = None, max_in_flight: int | None = None):
        self.workers = workers or default_workers()
        self.max_in_flight = max_in_flight or self.workers * 2

    def _pool(self, stage: Stage, workers: int) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(stage,),
        )

    def run(self, stage: Stage, items: list[tuple[int, dict]]) -> Iterator[tuple[int, dict]]:
        saved = {k: os.environ.get(k) for k in THREAD_ENV_VARS}
        for k in THREAD_ENV_VARS:
            os.environ[k] = "1"  # inherited by the spawned workers: N workers use N cores
        try:
            yield from self._run(stage, items)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _run(self, stage: Stage, items: list[tuple[int, dict]]) -> Iterator[tuple[int, dict]]:
        queue = list(reversed(stage.chunks(items)))
        suspects: list[tuple[int, dict]] = []
        while queue or suspects:
            if suspects:
                yield from self._run_isolated(stage, suspects)
                suspects = []
                continue
            pool = self._pool(stage, self.workers)
            in_flight: dict[cf.Future, list[tuple[int, dict]]] = {}
            try:
                while queue or in_flight:
                    broken = False
                    while queue and len(in_flight) < self.max_in_flight:
                        chunk = queue.pop()
                        try:
                            in_flight[pool.submit(_run_batch_in_worker, [row for _, row in chunk])] = chunk
                        except cf.process.BrokenProcessPool:  # a worker died since the last wait
                            queue.append(chunk)
                            broken = True
                            break
                    if not broken:
                        done, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
                        for fut in done:
                            chunk = in_flight.pop(fut)
                            try:
                                outcomes = fut.result()
                            except cf.process.BrokenProcessPool:
                                suspects.extend(chunk)
                                broken = True
                                continue
                            for (index, _), outcome in zip(chunk, outcomes):
                                yield index, outcome
                    if broken:
                        if not in_flight and not suspects:
                            raise RunAborted(self._setup_crash_message(stage))
                        for chunk in in_flight.values():
                            suspects.extend(chunk)
                        in_flight.clear()
                        log.warning(
                            "%s: a worker process died; rerunning the %d items that were in "
                            "flight one at a time to find the one that kills it",
                            stage.name,
                            len(suspects),
                        )
                        break
            finally:
                pool.shutdown(wait=not suspects, cancel_futures=True)

    @staticmethod
    def _setup_crash_message(stage: Stage) -> str:
        return (f"{stage.name}: worker processes die before running any item (the stage's per-worker "
                "setup crashes); rerun with --executor inline to see the error")

    def _run_isolated(self, stage: Stage, suspects: list[tuple[int, dict]]) -> Iterator[tuple[int, dict]]:
        """One suspect at a time in a one-worker pool (set up once, and again after each crash)."""
        pool = None
        try:
            for index, row in sorted(suspects, key=lambda x: x[0]):
                if pool is None:
                    pool = self._pool(stage, 1)
                    try:
                        pool.submit(_worker_ready).result()
                    except cf.process.BrokenProcessPool:
                        raise RunAborted(self._setup_crash_message(stage)) from None
                try:
                    outcome = pool.submit(_run_in_worker, row).result()
                except cf.process.BrokenProcessPool:
                    outcome = {
                        "ok": False,
                        "code": "worker_crashed",
                        "reason": "the worker process died while processing this item "
                        "(a crash in native code or the out-of-memory killer)",
                    }
                    pool.shutdown(wait=True, cancel_futures=True)
                    pool = None
                yield index, outcome
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


class InlineExecutor:
    """Runs items (or a batched stage's batches) in this process, one after another: for debugging
    and tiny inputs."""

    workers = 1

    def run(self, stage: Stage, items: list[tuple[int, dict]]) -> Iterator[tuple[int, dict]]:
        state = stage.setup(stage.settings) if stage.setup else stage.settings
        for chunk in stage.chunks(items):
            for (index, _), outcome in zip(chunk, run_batch(stage, [row for _, row in chunk], state)):
                yield index, outcome


def make_executor(name: str, workers: int | None = None, **ray_options: Any) -> Executor:
    """``local``, ``inline`` or ``ray`` (``ray_options`` go to ``pipeline.ray_executor.RayExecutor``)."""
    if name == "local":
        return LocalExecutor(workers)
    if name == "inline":
        return InlineExecutor()
    if name == "ray":
        from pipeline.ray_executor import RayExecutor

        return RayExecutor(workers=workers, **ray_options)
    raise StageConfigError(f"--executor: unknown executor {name!r} (choose 'local', 'inline' or 'ray')")

