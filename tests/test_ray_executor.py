"""The Ray executor gives the same outputs as the local one, survives dead workers and a killed driver."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.runner import LocalExecutor, Stage, StageConfigError, errors_path, ledger_path, make_executor, run_stage
from pipeline.records import read_jsonl
from pipeline.testing import echo_item

ray = pytest.importorskip("ray", reason="the 'ray' extra is installed by make setup")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ECHO = Stage(name="echo", process=echo_item, settings={"tag": "r"})


@pytest.mark.parametrize("use_actors,batch_size", [(False, 1), (False, 3), (True, 2)])
def test_ray_and_local_executors_write_the_same_output(tmp_path, local_ray, use_actors, batch_size):
    rows = [{"id": f"r{i:02d}", "sleep": 0.01 * (i % 3)} for i in range(15)]
    rows[4] = {"id": "r04", "fail": "silent"}
    inp = write_rows(tmp_path / "in.jsonl", rows)
    run_stage(ECHO, inp, tmp_path / "local.jsonl", executor=LocalExecutor(2), progress=False)
    executor = make_executor("ray", address="local", use_actors=use_actors, batch_size=batch_size)
    assert executor.workers == 2
    run_stage(ECHO, inp, tmp_path / "ray.jsonl", executor=executor, progress=False)
    assert read_jsonl(tmp_path / "ray.jsonl") == read_jsonl(tmp_path / "local.jsonl")
    assert read_jsonl(errors_path(tmp_path / "ray.jsonl")) == read_jsonl(errors_path(tmp_path / "local.jsonl"))


@pytest.mark.parametrize("use_actors", [False, True])
def test_a_dead_ray_worker_fails_only_its_item(tmp_path, local_ray, use_actors):
    rows = [{"id": f"r{i}"} for i in range(6)]
    rows[3] = {"id": "r3", "crash": True}
    inp = write_rows(tmp_path / "in.jsonl", rows)
    executor = make_executor("ray", address="local", use_actors=use_actors, batch_size=2)
    summary = run_stage(ECHO, inp, tmp_path / "out.jsonl", executor=executor, progress=False)
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == ["r0", "r1", "r2", "r4", "r5"]
    assert summary.failed == {"worker_crashed": 1}


@pytest.mark.parametrize("use_actors,ray_batch_size", [(False, 2), (True, 1)])
def test_a_batched_stage_on_ray_runs_its_batches_and_isolates_a_crash(tmp_path, local_ray, use_actors, ray_batch_size):
    import runner_fixtures
    from runner_fixtures import batch_calls, batched_echo, single_calls

    ray.cloudpickle.register_pickle_by_value(runner_fixtures)  # Ray's workers do not see tests/ on their path
    rows = [{"id": f"r{i:02d}"} for i in range(10)]
    rows[2] = {"id": "r02", "fail": "silent"}
    inp = write_rows(tmp_path / "in.jsonl", rows)
    calls = tmp_path / "calls"
    calls.mkdir()
    executor = make_executor("ray", address="local", use_actors=use_actors, batch_size=ray_batch_size)
    run_stage(batched_echo(3, calls, tag="r"), inp, tmp_path / "ray.jsonl", executor=executor, progress=False)
    run_stage(ECHO, inp, tmp_path / "local.jsonl", executor=LocalExecutor(2), progress=False)
    assert read_jsonl(tmp_path / "ray.jsonl") == read_jsonl(tmp_path / "local.jsonl")
    assert read_jsonl(errors_path(tmp_path / "ray.jsonl")) == read_jsonl(errors_path(tmp_path / "local.jsonl"))
    ids = [r["id"] for r in rows]
    assert sorted(batch_calls(calls)) == [ids[i : i + 3] for i in range(0, 9, 3)]
    assert single_calls(calls) == {"r09": 1}  # a batch of one goes through the per-item function

    rows[7] = {"id": "r07", "crash": True}
    inp = write_rows(tmp_path / "crash.jsonl", rows)
    summary = run_stage(batched_echo(3), inp, tmp_path / "crash-out.jsonl", executor=executor, progress=False)
    assert [r["id"] for r in read_jsonl(tmp_path / "crash-out.jsonl")] == [i for i in ids if i not in ("r02", "r07")]
    assert summary.failed == {"silent": 1, "worker_crashed": 1}


def test_crop_on_ray_matches_local_on_demo_data(tmp_path, local_ray):
    from llark.cli import main

    assert main(["demo-data", "--out", str(tmp_path / "src"), "--clips", "8", "--duration", "4"]) == 0
    assert main(["ingest", "demo", "--root", str(tmp_path / "src"), "--out", str(tmp_path / "in.jsonl")]) == 0
    for name, extra in [("local", []), ("ray", ["--executor", "ray", "--address", "local"])]:
        assert main(["crop", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / f"{name}.jsonl"),
                     "--clips-dir", str(tmp_path / f"clips-{name}"), "--no-progress", *extra]) == 0
    local, on_ray = read_jsonl(tmp_path / "local.jsonl"), read_jsonl(tmp_path / "ray.jsonl")
    assert len(local) == 8
    for a, b in zip(local, on_ray):
        assert Path(a.pop("clip_path")).read_bytes() == Path(b.pop("clip_path")).read_bytes()
        assert a == b


KILLABLE_DRIVER = textwrap.dedent(
    """
    import sys
    import ray
    from pipeline.runner import Stage, make_executor, run_stage
    from pipeline.testing import echo_item
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    stage = Stage(name="echo", process=echo_item, settings={"tag": "k"})
    run_stage(stage, sys.argv[1], sys.argv[2], executor=make_executor("ray", address="local"), progress=False)
    """
)


@pytest.mark.slow
def test_killed_ray_driver_resumes_to_the_local_output(tmp_path, local_ray):
    rows = [{"id": f"r{i:03d}", "sleep": 0.05} for i in range(60)]
    inp = write_rows(tmp_path / "in.jsonl", rows)
    out = tmp_path / "ray.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE_DRIVER, str(inp), str(out)], cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if ledger_path(out).exists() and ledger_path(out).read_text().count("\n") > 10:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    run_stage(ECHO.__class__(name="echo", process=echo_item, settings={"tag": "k"}), inp, out,
              executor=make_executor("ray", address="local"), progress=False)
    run_stage(Stage(name="echo", process=echo_item, settings={"tag": "k"}), inp, tmp_path / "local.jsonl",
              executor=LocalExecutor(2), progress=False)
    assert read_jsonl(out) == read_jsonl(tmp_path / "local.jsonl")


def test_ray_flag_without_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(StageConfigError, match=r"pip install 'llark\[ray\]'"):
        make_executor("ray", address="local")


def test_bad_ray_options_fail_before_work(local_ray):
    with pytest.raises(StageConfigError, match="batch-size"):
        make_executor("ray", address="local", batch_size=0)
    with pytest.raises(StageConfigError, match="GPU"):
        make_executor("ray", address="local", use_actors=True, num_gpus=1)
