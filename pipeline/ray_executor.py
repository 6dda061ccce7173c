"""Run a stage's per-item function on a Ray cluster.

The driver (the machine running ``llark <stage> --executor ray``) keeps the ledger, the output
files and the progress bar exactly as with the local executor; Ray only runs the per-item function.
So resume, error records and input-ordered outputs are the same whichever executor ran the items,
and no two workers ever write the same file.

Two ways to place the work:

- **tasks** (the default, for CPU stages such as crop and augment): batches of items become Ray
  tasks of ``num_cpus`` each. A worker process keeps the stage's per-worker state (``Stage.setup``)
  between tasks, so models are built once per process, not once per task.
- **actors** (``use_actors=True``, for GPU stages such as embed): a fixed pool of actors, each
  holding ``num_gpus`` and loading the model once, receives batches as it frees up.

Each task or actor call takes ``batch_size`` items (``--ray-batch-size``); for a batched stage
(``Stage.process_batch``) that is rounded up to a multiple of the stage's batch size, and the
worker runs the stage's batches with ``pipeline.runner.run_batch``, so a batch that fails as a
whole is rerun item by item there. A call whose worker dies (a native crash, the OOM killer, a lost
node) is split and its items are rerun one at a time; an item that kills its worker again is
recorded as ``worker_crashed``.
Ray is an optional dependency: ``pip install 'llark[ray]'``.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterator

from pipeline.runner import THREAD_ENV_VARS, Stage, StageConfigError, run_chunks

log = logging.getLogger("llark")

WORKER_CRASHED = {
    "ok": False,
    "code": "worker_crashed",
    "reason": "the Ray worker died while processing this item "
    "(a crash in native code, the out-of-memory killer, or a lost node)",
}

_STATE_CACHE: dict[str, Any] = {}


def import_ray():
    try:
        import ray
    except ImportError:
        raise StageConfigError(
            "--executor ray needs Ray, which is not installed; install it with "
            "pip install 'llark[ray]' (or pip install ray), or use --executor local"
        ) from None
    return ray


def _stage_key(stage: Stage) -> str:
    return json.dumps([stage.name, stage.process.__module__, stage.process.__qualname__, stage.settings_json()],
                      sort_keys=True, default=str)


def _state_for(stage: Stage) -> Any:
    """The stage's per-worker state, built once per worker process and kept for later tasks."""
    key = _stage_key(stage)
    if key not in _STATE_CACHE:
        _STATE_CACHE.clear()  # one stage at a time per process: free the previous one's models
        _STATE_CACHE[key] = stage.setup(stage.settings) if stage.setup else stage.settings
    return _STATE_CACHE[key]


def run_batch_in_task(stage: Stage, rows: list[dict]) -> list[dict]:
    return run_chunks(stage, rows, _state_for(stage))


class StageActor:
    """Holds one stage's state (e.g. a model on a GPU) and runs batches of items on it."""

    def __init__(self, stage: Stage):
        self.stage = stage
        self.state = stage.setup(stage.settings) if stage.setup else stage.settings

    def run(self, rows: list[dict]) -> list[dict]:
        return run_chunks(self.stage, rows, self.state)


class RayExecutor:
    """See the module docstring. ``address``: ``"auto"`` (a running cluster found from this node),
    ``"HOST:PORT"``, or ``"local"`` (start a Ray instance on this machine)."""

    def __init__(
        self,
        address: str = "auto",
        workers: int | None = None,
        use_actors: bool = False,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        batch_size: int = 1,
        init_options: dict | None = None,
    ):
        if batch_size < 1:
            raise StageConfigError(f"--ray-batch-size must be at least 1, got {batch_size}")
        if num_cpus <= 0 or num_gpus < 0:
            raise StageConfigError("--ray-num-cpus must be positive and --ray-num-gpus not negative")
        self.ray = import_ray()
        if not self.ray.is_initialized():
            options = dict(init_options or {})
            threads = str(max(1, int(num_cpus)))
            options.setdefault("runtime_env", {"env_vars": {k: threads for k in THREAD_ENV_VARS}})
            options.setdefault("log_to_driver", False)
            try:
                self.ray.init(address=None if address == "local" else address, **options)
            except ConnectionError as exc:
                raise StageConfigError(f"--address {address}: no Ray cluster reachable ({exc})") from None
        resources = self.ray.cluster_resources()
        per_worker = num_gpus if use_actors and num_gpus > 0 else num_cpus
        available = resources.get("GPU" if use_actors and num_gpus > 0 else "CPU", 0)
        if available < per_worker:
            raise StageConfigError(
                f"the Ray cluster offers {available:g} {'GPU' if num_gpus and use_actors else 'CPU'}s; "
                f"each worker needs {per_worker:g}"
            )
        self.workers = workers or max(1, int(available // per_worker))
        self.use_actors, self.num_cpus, self.num_gpus, self.batch_size = use_actors, num_cpus, num_gpus, batch_size

    # -- placement -----------------------------------------------------------------------------

    def _task_submitter(self, stage: Stage):
        remote = self.ray.remote(run_batch_in_task).options(
            num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=0
        )
        stage_ref = self.ray.put(stage)
        return lambda rows, _slot: remote.remote(stage_ref, rows)

    def _actor_pool(self, stage: Stage) -> list:
        actor_cls = self.ray.remote(StageActor).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_restarts=0)
        return [actor_cls.remote(stage) for _ in range(self.workers)]

    # -- the loop ------------------------------------------------------------------------------

    def run(self, stage: Stage, items: list[tuple[int, dict]]) -> Iterator[tuple[int, dict]]:
        ray = self.ray
        crash_errors = (ray.exceptions.WorkerCrashedError, ray.exceptions.RayActorError,
                        ray.exceptions.NodeDiedError, ray.exceptions.OutOfMemoryError)
        per_call = self.batch_size
        if stage.batched:
            per_call = -(-self.batch_size // stage.batch_size) * stage.batch_size
        batches = [items[i : i + per_call] for i in range(0, len(items), per_call)]
        batches.reverse()
        retry: list[tuple[int, dict]] = []  # items of crashed batches, to rerun alone
        actors = self._actor_pool(stage) if self.use_actors else []
        submit_task = None if self.use_actors else self._task_submitter(stage)
        idle = list(range(len(actors)))
        in_flight: dict[Any, tuple[list[tuple[int, dict]], bool, int | None]] = {}

        def submit(batch: list[tuple[int, dict]], alone: bool) -> None:
            rows = [row for _, row in batch]
            if self.use_actors:
                slot = idle.pop()
                ref = actors[slot].run.remote(rows)
            else:
                slot, ref = None, submit_task(rows, None)
            in_flight[ref] = (batch, alone, slot)

        try:
            while batches or retry or in_flight:
                capacity = len(idle) if self.use_actors else self.workers * 2 - len(in_flight)
                while capacity > 0 and (retry or batches):
                    if retry:
                        submit([retry.pop()], alone=True)
                    else:
                        submit(batches.pop(), alone=False)
                    capacity -= 1
                [ref], _ = ray.wait(list(in_flight), num_returns=1)
                batch, alone, slot = in_flight.pop(ref)
                try:
                    outcomes = ray.get(ref)
                except crash_errors:
                    if self.use_actors:
                        actors[slot] = self.ray.remote(StageActor).options(
                            num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_restarts=0).remote(stage)
                    if alone:
                        outcomes = [WORKER_CRASHED]
                    else:
                        log.warning("%s: a Ray worker died; rerunning its %d items one at a time", stage.name, len(batch))
                        retry.extend(reversed(batch))
                        outcomes = None
                if slot is not None:
                    idle.append(slot)
                if outcomes is not None:
                    for (index, _), outcome in zip(batch, outcomes):
                        yield index, outcome
        finally:
            if not self.use_actors:
                for ref in in_flight:
                    ray.cancel(ref, force=True)
            for actor in actors:
                ray.kill(actor)
