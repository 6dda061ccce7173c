"""The multi-node launch scripts, run for real on one machine (the training runs are slow).

``launch/slurm.sbatch`` and ``launch/multinode.sh`` start a two-node training run: two "nodes" of one
process each, talking over gloo on this machine. The cluster tools they call are stood in for by
``tests/launch_stand_ins`` (``scontrol``, ``srun``, ``pdsh``, ``ssh``), which run the same commands
here instead of on remote nodes; the scripts, the DeepSpeed launcher (its multi-node pdsh path) and the
training are the real ones. What this cannot show is NCCL over a real network.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_train import REPO, free_port, tiny_lm_dir, train_env, write_shards

STAND_INS = REPO / "tests" / "launch_stand_ins"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    write_shards(d, n_samples=32, n_shards=4, dim=16, frames=(3, 6), pairs=(1, 2))
    return d


def checkout(tmp_path: Path, shards: Path) -> Path:
    """A directory laid out like the repository root (launch/, llark/) with a training config."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "launch", root / "launch")
    (root / "llark").symlink_to(REPO / "llark")
    config = {
        "model": {"lm_path": str(tiny_lm_dir()), "dtype": "float32", "attn_implementation": "eager",
                  "gradient_checkpointing": False},
        "data": {"shards": [str(shards)], "num_workers": 0},
        "optim": {"max_steps": 4, "warmup_steps": 0, "lr": 3e-3},
        "global_batch": 4, "micro_batch": 2, "save_every": 4, "log_every": 1, "tensorboard": False,
        "output_dir": str(tmp_path / "out"),
    }
    (root / "config.yaml").write_text(json.dumps(config))  # YAML reads JSON
    return root


def run_script(root: Path, command: list[str], env: dict[str, str], timeout: int = 400) -> str:
    env = {**train_env(), **env, "MASTER_PORT": str(free_port()),
           "PATH": os.pathsep.join([str(STAND_INS), str(Path(sys.executable).parent), os.environ["PATH"]])}
    proc = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"no result after {timeout} s (a hung rank?)\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    return output


def assert_two_ranks_trained(output: str, out: Path) -> None:
    assert "train: 2 processes, global batch 4 = micro-batch 2 x grad-accum 1 x world size 2" in output
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    checkpoint = out / "checkpoints" / "step_00000004"
    for rank in (0, 1):
        assert json.loads((checkpoint / f"rank_{rank:05d}.json").read_text())["loader"]["positions"]
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["srun", "deepspeed"])
def test_slurm_script_trains_on_two_nodes(tmp_path, shards, launcher):
    root = checkout(tmp_path, shards)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "127.0.0.1,localhost", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "1", "LAUNCHER": launcher}
    if launcher == "srun":
        slurm["PYTHON"] = sys.executable
    # else the checkout has no .venv: the scripts fall back to python3 on PATH (this interpreter's).
    output = run_script(root, ["bash", "launch/slurm.sbatch", "config.yaml"], slurm)
    hostfile = root / "runs" / "slurm-4242.hostfile"
    assert hostfile.read_text() == "127.0.0.1 slots=1\nlocalhost slots=1\n"
    assert "llark: 2 nodes x 1 GPUs; master 127.0.0.1:" in output
    if launcher == "deepspeed":
        # The deepspeed launcher started one launch per node, through pdsh, with the exported environment.
        assert "nnodes=2, num_local_procs=1, node_rank=1" in output
        env_file = (root / ".deepspeed_env").read_text()
        assert "NCCL_SOCKET_IFNAME=" in env_file and "HF_HUB_OFFLINE=1" in env_file
    assert_two_ranks_trained(output, tmp_path / "out")


def test_multinode_script_refuses_a_host_it_cannot_reach(tmp_path, shards):
    root = checkout(tmp_path, shards)
    (root / "hostfile").write_text("127.0.0.1 slots=1\nunreachable-node slots=1\n")
    stand_ins = tmp_path / "bin"
    shutil.copytree(STAND_INS, stand_ins)
    (stand_ins / "ssh").write_text('#!/usr/bin/env bash\nfor a in "$@"; do [ "$a" = unreachable-node ] && exit 255; '
                                   'done\nexit 0\n')
    env = {**train_env(), "PYTHON": sys.executable,
           "PATH": os.pathsep.join([str(stand_ins), os.environ["PATH"]])}
    result = subprocess.run(["bash", "launch/multinode.sh", "hostfile", "config.yaml"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot ssh to unreachable-node without a password" in result.stderr
    assert not (tmp_path / "out").exists()


def test_launch_scripts_name_the_missing_interpreter(tmp_path):
    root = tmp_path / "checkout"
    shutil.copytree(REPO / "launch", root / "launch")
    bin_dir = tmp_path / "bin"  # bash only: no python3 on PATH
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "mkdir"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    result = subprocess.run(["bash", "-c", "source launch/select_python.sh && echo $PYTHON"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "no Python found; set PYTHON" in result.stderr
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "python").symlink_to(sys.executable)
    result = subprocess.run(["bash", "-c", "source launch/select_python.sh && echo $PYTHON"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == ".venv/bin/python"
    result = subprocess.run(["bash", "-c", "source launch/select_python.sh && echo $PYTHON"], cwd=root,
                            env={**env, "PYTHON": "/opt/env/bin/python"}, capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "/opt/env/bin/python"


@pytest.mark.slow
def test_accelerate_config_trains_on_two_machines(tmp_path, shards):
    """launch/accelerate_config.yaml as written for 2 nodes, with one process per "machine": the two
    `accelerate launch` commands a user runs on the two nodes, run side by side here."""
    root = checkout(tmp_path, shards)
    port = str(free_port())
    env = {**train_env(), "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    machines = [
        subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          "launch/accelerate_config.yaml", "--num_machines", "2", "--num_processes", "2",
                          "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                          "-m", "llark.train", "--config", "config.yaml"],
                         cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for machine in machines:
            outputs.append(machine.communicate(timeout=400)[0])
    except subprocess.TimeoutExpired:
        for machine in machines:
            os.killpg(machine.pid, signal.SIGKILL)
        pytest.fail("no result after 400 s (a hung rank?)")
    for machine, output in zip(machines, outputs):
        assert machine.returncode == 0, output[-4000:]
    assert_two_ranks_trained(outputs[0], tmp_path / "out")
    assert "train: " not in outputs[1]  # rank 1 trains quietly: one log, from rank 0
