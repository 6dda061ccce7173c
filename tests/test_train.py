"""The training recipe: config validation (fast), and DeepSpeed runs on CPU (slow): loss falls,
exact resume after a kill, two processes with ZeRO-2, the projector-only and LoRA modes, export, and
an optimizer step whose gradient is that of the per-token mean loss of the global batch."""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fixtures_train import free_port, tiny_lm_dir, train_env, write_shards  # noqa: E402

from llark.data import DataConfigError  # noqa: E402
from llark.train.stages import stage_configs  # noqa: E402
from llark.train import (  # noqa: E402
    TrainConfigError, TrainRecipe, deepspeed_config, load_config, lr_multiplier,
)

REPO = Path(__file__).resolve().parents[1]
DIM = 16


@pytest.fixture
def single_process_env(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    write_shards(d, n_samples=32, n_shards=4, dim=DIM, frames=(3, 6), pairs=(1, 2))
    return d


# ---------------------------------------------------------------------------------------------
# Config (fast)


def test_paper_defaults():
    cfg = load_config(None)
    o = cfg.optim
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.warmup_steps, o.max_steps) == (5e-5, (0.9, 0.999), 1e-6, 0.0,
                                                                                 3000, 100_000)
    assert cfg.global_batch == 32 and cfg.model.mode == "full"
    assert cfg.grad_accum_for(8) == 1 and cfg.grad_accum_for(2) == 4


def test_batch_product_must_equal_global_batch():
    cfg = load_config(None, {"micro_batch": 3})
    with pytest.raises(TrainConfigError, match=r"global_batch \(32\) != micro_batch \(3\)"):
        cfg.grad_accum_for(4)
    cfg = load_config(None, {"grad_accum": 2, "micro_batch": 4})
    with pytest.raises(TrainConfigError, match="world size \\(2\\)"):
        cfg.grad_accum_for(2)
    assert cfg.grad_accum_for(4) == 2


@pytest.mark.parametrize("overrides,field", [
    ({"optim.lr": -1}, "optim.lr"),
    ({"model.mode": "half"}, "model.mode"),
    ({"data.conversaton": "pair"}, "data.conversaton"),
    ({"optim.warmup_steps": 10, "optim.max_steps": 5}, "warmup_steps"),
    ({"model.quantization": "4bit"}, "mode: lora"),
    ({"model.attn_implementation": "flashy"}, "model.attn_implementation"),
    ({"data.on_too_long": "truncate"}, "data.on_too_long"),
    ({"validation.every": -1}, "validation.every"),
    ({"model.lora.target_modules": "all"}, "model.lora.target_modules"),
])
def test_bad_fields_are_named(overrides, field):
    with pytest.raises(TrainConfigError, match=field):
        load_config(None, overrides)


def test_flash_attention_without_its_package_is_refused_when_the_config_is_read():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(TrainConfigError, match="flash_attention_2 needs the flash_attn package"):
        load_config(None, {"model.attn_implementation": "flash_attention_2"})


def test_every_launch_config_loads():
    for yaml_path in sorted((REPO / "launch").glob("*.yaml")):
        if "accelerate" in yaml_path.name:
            continue
        cfg = load_config(yaml_path)
        for json_path in sorted((REPO / "launch").glob("zero*.json")):
            ds = deepspeed_config(cfg, cfg.grad_accum_for(1) if cfg.global_batch % cfg.micro_batch == 0 else 1, 1,
                                  str(json_path))
            assert ds["train_batch_size"] == cfg.global_batch and ds["optimizer"]["type"] == "AdamW"
            assert ds["optimizer"]["params"]["betas"] == list(cfg.optim.betas)
            # torch's fused AdamW on the GPU (no extra fp32 copy per step); DeepSpeed's CPU Adam when offloaded.
            assert ds["optimizer"]["params"].get("fused", False) is ("offload" not in json_path.name)
            stage = ds["zero_optimization"]["stage"]
            assert stage in (2, 3)
            if stage == 3:
                assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
            else:
                assert ds["zero_optimization"]["overlap_comm"] is False
    paper = load_config(REPO / "launch" / "llama2_7b_chat.yaml")
    assert paper.model.encoder_dim == 4800 and paper.optim.warmup_steps == 3000 and paper.optim.max_steps == 100_000
    for name in ("llama2_7b_chat_two_stage.yaml", "qwen2_5_7b_instruct_two_stage.yaml"):
        connector, instruct = stage_configs(load_config(REPO / "launch" / name))
        assert connector.model.mode == "projector" and connector.data.task_families == ["captioning", "understanding"]
        assert instruct.model.mode in ("full", "lora") and instruct.data.task_families is None
        assert instruct.model.init_from == str(connector.final_dir)


def test_deepspeed_json_conflicting_with_the_config_is_refused(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    with pytest.raises(TrainConfigError, match="train_micro_batch_size_per_gpu is 8"):
        deepspeed_config(load_config(None), 8, 1, str(bad))
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(TrainConfigError, match="optimizer"):
        deepspeed_config(load_config(None), 8, 1, str(bad))


def test_warmup_then_cosine():
    assert lr_multiplier(0, 3000, 100_000) == pytest.approx(1 / 3000)
    assert lr_multiplier(2999, 3000, 100_000) == pytest.approx(1.0)
    assert lr_multiplier(3000 + 48_500, 3000, 100_000) == pytest.approx(0.5)
    assert lr_multiplier(100_000, 3000, 100_000) == pytest.approx(0.0)
    assert lr_multiplier(100_000, 3000, 100_000, min_ratio=0.1) == pytest.approx(0.1)


def test_resume_refuses_another_schedule_length_unless_asked_and_another_worker_count(tmp_path):
    from llark.train.checkpoint import read_trainer_state, save_trainer_state

    config = lambda **changes: load_config(None, {"data.shards": ["shards"], **changes})  # noqa: E731
    checkpoint = tmp_path / "step_00050000"
    checkpoint.mkdir()
    save_trainer_state(checkpoint, 50_000, 1, config())
    with pytest.raises(TrainConfigError, match=r"max_steps=100000, this run says 200000: at step 50000 the "
                                               r"learning-rate multiplier would jump from 0.52 to 0.87.*"
                                               r"optim.extend_schedule=true"):
        read_trainer_state(checkpoint, 1, config(**{"optim.max_steps": 200_000}))
    read_trainer_state(checkpoint, 1, config(**{"optim.max_steps": 200_000, "optim.extend_schedule": True}))
    with pytest.raises(TrainConfigError, match=r"data.num_workers"):
        read_trainer_state(checkpoint, 1, config(**{"data.num_workers": 4}))
    read_trainer_state(checkpoint, 1, config(log_every=5, save_every=50, **{"model.compile": True}))


def test_continuing_an_exported_model_in_4bit_keeps_its_weights_and_settings(tmp_path, shards, single_process_env):
    """model.init_from with QLoRA: the exported LM is loaded quantized, and the export merges the adapters into
    the exported LM read again in full precision (not into model.lm_path's); a different system prompt than
    the exported model's is refused."""
    import torch
    from bitsandbytes.nn import Linear4bit

    from llark.model import LlarkConfig, build_llark, export_pretrained
    from llark.model.llark import merge_adapters_into_full_precision, projector_state

    manifest = json.loads((shards / "encoder.json").read_text())
    identity = {k: manifest[k] for k in ("name", "layer", "frame_rate_hz", "dim", "dtype", "config")}
    model, tok = build_llark(LlarkConfig(lm_path=str(tiny_lm_dir()), encoder_dim=DIM, encoder=identity,
                                         system_prompt="You are a music assistant."), dtype="float32")
    with torch.no_grad():
        model.lm.model.layers[0].mlp.down_proj.weight.add_(0.5)  # what an earlier stage trained
    stage1 = export_pretrained(tmp_path / "stage1", model.lm, tok, model.config, projector_state(model))
    settings = {"data.shards": [str(shards)], "model.init_from": str(stage1), "model.mode": "lora",
                "model.quantization": "4bit", "model.dtype": "float32", "model.attn_implementation": "eager",
                "model.lora.r": 4, "global_batch": 1, "micro_batch": 1, "output_dir": str(tmp_path / "run")}
    recipe = TrainRecipe(load_config(None, settings))
    assert recipe.base_lm_dir == stage1
    recipe._setup_model(new_projector=False)
    assert isinstance(recipe.model.lm.base_model.model.model.layers[0].self_attn.q_proj.base_layer, Linear4bit)
    merged = merge_adapters_into_full_precision(recipe.model.lm, recipe.base_lm_dir, "float32")
    torch.testing.assert_close(merged.model.layers[0].mlp.down_proj.weight, model.lm.model.layers[0].mlp.down_proj.weight)
    with pytest.raises(TrainConfigError, match="model.system_prompt .* differs from model.init_from's"):
        TrainRecipe(load_config(None, {**settings, "model.system_prompt": "Answer in French."}))


def test_weight_decay_skips_biases_norms_and_embeddings():
    from llark.model import LlarkConfig, build_llark, configure_training
    from llark.train import OptimSection
    from llark.train.optimizer import parameter_groups

    model, _ = build_llark(LlarkConfig(lm_path=str(tiny_lm_dir()), encoder_dim=DIM), dtype="float32",
                           attn_implementation="eager")
    configure_training(model, "full", gradient_checkpointing=False)
    plain = parameter_groups(model, OptimSection(projector_lr=1e-3))
    assert [(len(g["params"]), g["lr"]) for g in plain] == [(2, 1e-3), (len(list(model.lm.parameters())), 5e-5)]
    groups = parameter_groups(model, OptimSection(weight_decay=0.1, projector_lr=1e-3))
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert len(decay) == sum(1 for p in model.parameters() if p.requires_grad)
    for name, p in model.named_parameters():
        expected = 0.0 if p.ndim < 2 or "embed_tokens" in name else 0.1
        assert decay[id(p)] == expected, name
    assert {g["lr"] for g in groups if any(p is model.projector.weight for p in g["params"])} == {1e-3}


def test_encoder_mismatch_refused_before_any_model_loads(shards, single_process_env):
    cfg = load_config(None, {"data.shards": [str(shards)], "model.encoder_dim": 4800, "model.lm_path": "/nonexistent",
                             "global_batch": 1, "micro_batch": 1})
    with pytest.raises(DataConfigError, match="dimension 16.*projector takes 4800"):
        TrainRecipe(cfg)


def test_a_run_that_will_not_fit_the_gpu_is_warned_before_any_weight_loads(tmp_path, shards, single_process_env):
    from llark.model.memory import GB

    lm_dir = tmp_path / "llama-2-7b"  # config.json and a tokenizer: no weight is loaded to estimate
    lm_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_lm_dir() / name, lm_dir / name)
    (lm_dir / "config.json").write_text(json.dumps({
        "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 11008,
        "num_hidden_layers": 32, "vocab_size": 32000, "tie_word_embeddings": False}))
    cfg = load_config(REPO / "launch" / "llama2_7b_chat.yaml",
                      {"data.shards": [str(shards)], "model.encoder_dim": DIM, "model.lm_path": str(lm_dir),
                       "global_batch": 4, "micro_batch": 4, "data.max_seq_len": 1024})
    recipe = TrainRecipe(cfg)
    warning = recipe.gpu_memory_warning(DIM, 40 * GB)  # a full 7B fine-tune on one 40 GB GPU
    assert warning and "expect out-of-memory" in warning and "this GPU has 40.0 GB" in warning
    assert recipe.gpu_memory_warning(DIM, 1000 * GB) is None
    qlora = TrainRecipe(load_config(REPO / "launch" / "llama2_7b_chat.yaml", {
        "data.shards": [str(shards)], "model.encoder_dim": DIM, "model.lm_path": str(lm_dir), "global_batch": 4,
        "micro_batch": 1, "data.max_seq_len": 1024, "model.mode": "lora", "model.quantization": "4bit"}))
    assert qlora.gpu_memory_warning(DIM, 24 * GB) is None
    (lm_dir / "config.json").write_text("{}")  # not a Llama config: no estimate, no warning
    assert recipe.gpu_memory_warning(DIM, 1 * GB) is None


def test_frozen_lm_checkpoints_load_back_their_trained_weights_only():
    import torch

    from llark.train import load_trained_weights

    model = torch.nn.ModuleDict({"lm": torch.nn.Linear(4, 4), "projector": torch.nn.Linear(3, 4)})
    model["lm"].requires_grad_(False)
    frozen = model["lm"].weight.clone()
    saved = {k: torch.full_like(v, 7.0) for k, v in model.state_dict().items() if k.startswith("projector.")}
    load_trained_weights(saved, model)
    assert torch.equal(model["projector"].weight, torch.full((4, 3), 7.0))
    assert torch.equal(model["lm"].weight, frozen)
    del saved["projector.bias"]
    with pytest.raises(TrainConfigError, match=r"lacks 1 trained weights, e.g. \['projector.bias'\]"):
        load_trained_weights(saved, model)


def _check_directory_on_rank(rank: int, directories: list[str], port: int) -> None:
    import torch.distributed as dist

    from llark.train import check_shared_directory

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        check_shared_directory(Path(directories[rank]), patience_s=0.5)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shared", [True, False])
def test_output_dir_must_be_shared_by_every_rank(tmp_path, shared):
    """On several nodes each rank sees its own local disk unless output_dir is on a shared filesystem; two
    directories stand for two nodes' disks here."""
    import torch.multiprocessing as mp

    directories = [str(tmp_path / "a"), str(tmp_path / ("a" if shared else "b"))]
    if shared:
        mp.start_processes(_check_directory_on_rank, args=(directories, free_port()), nprocs=2, start_method="fork")
        assert list((tmp_path / "a").iterdir()) == []  # the marker is removed
    else:
        with pytest.raises(mp.ProcessRaisedException, match="not shared by all processes \\(rank 1 on "):
            mp.start_processes(_check_directory_on_rank, args=(directories, free_port()), nprocs=2,
                               start_method="fork")


# ---------------------------------------------------------------------------------------------
# DeepSpeed on CPU (slow: each process starts DeepSpeed; the comm op compiles once per machine)


def train_args(out: Path, shards: Path, **overrides) -> list[str]:
    settings = {
        "model.lm_path": str(tiny_lm_dir()), "data.shards": [str(shards)], "model.dtype": "float32",
        "model.attn_implementation": "eager", "model.gradient_checkpointing": False,
        "optim.lr": 3e-3, "optim.warmup_steps": 2, "optim.max_steps": 10, "global_batch": 4, "micro_batch": 2,
        "save_every": 2, "log_every": 1, "output_dir": str(out), "data.num_workers": 2, "data.shuffle_buffer": 8,
        "data.group_shards": 2, "tensorboard": False, **overrides,
    }
    args = []
    for key, value in settings.items():
        args += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return args


def run_processes(command: list[str], timeout: int) -> subprocess.CompletedProcess:
    """Run ``command`` in its own process group and require exit status 0. On timeout the whole group
    is killed, so that a hung rank fails the test instead of outliving it."""
    proc = subprocess.Popen(command, env=train_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"no result after {timeout} s (a hung rank?)\n{stdout[-3000:]}{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def launcher(nproc: int, *target: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, *target]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), *target]


def run_train(out: Path, shards: Path, nproc: int = 1, timeout: int = 300, **overrides) -> subprocess.CompletedProcess:
    return run_processes(launcher(nproc, "-m", "llark.train") + train_args(out, shards, **overrides), timeout)


def run_worker(scenario: str, out: Path, shards: Path, nproc: int, timeout: int = 300,
               **overrides) -> subprocess.CompletedProcess:
    """tests/train_worker.py: the recipe's setup and loop on batches chosen per rank."""
    settings = {"model.lm_path": str(tiny_lm_dir()), "data.shards": [str(shards)], "model.dtype": "float32",
                "model.attn_implementation": "eager", "model.gradient_checkpointing": False,
                "optim.warmup_steps": 0, "output_dir": str(out), "data.num_workers": 0, "tensorboard": False,
                "log_every": 1, **overrides}
    out.mkdir(parents=True, exist_ok=True)
    return run_processes(launcher(nproc, str(REPO / "tests" / "train_worker.py"), scenario, json.dumps(settings),
                                  str(out)), timeout)


def kill_when_logged(command: list[str], metrics: Path, lines: int, timeout: float = 240) -> None:
    """Start a training run and SIGKILL it once ``metrics`` has ``lines`` lines."""
    proc = subprocess.Popen(command, env=train_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= lines:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()


def losses(out: Path) -> dict[int, float]:
    """Step → loss; a step logged twice (replayed after a resume) keeps its last value."""
    return {m["step"]: m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def zero3_json(directory: Path) -> Path:
    """launch/zero3.json with every parameter partitioned across ranks: the tiny model's parameters are
    all below stage3_param_persistence_threshold, which would otherwise keep them whole on every rank."""
    ds = json.loads((REPO / "launch" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = directory / "zero3_partitioned.json"
    path.write_text(json.dumps(ds))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("nproc,zero", [(1, 2), (2, 2), (2, 3)])
def test_step_gradient_is_the_per_token_mean_of_the_global_batch(tmp_path, shards, nproc, zero):
    import torch

    ds = str(REPO / "launch" / "zero2.json") if zero == 2 else str(zero3_json(tmp_path))
    run_worker("token_mean", tmp_path / "run", shards, nproc, deepspeed=ds, micro_batch=2, grad_accum=2,
               global_batch=2 * 2 * nproc, **{"optim.max_steps": 1})
    saved = torch.load(tmp_path / "run" / "gradients.pt")
    counts = saved["supervised"]
    assert len(counts) == 2 * nproc and max(counts) > 5 * min(counts), counts
    captured, reference = saved["captured"], saved["reference"]
    assert set(captured) == set(reference["token_mean"]) and "projector.weight" in captured
    for name, grad in reference["token_mean"].items():
        torch.testing.assert_close(captured[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # Weighting micro-batches equally would give another gradient: the check tells the two apart.
    flat = lambda grads: torch.cat([g.flatten() for g in grads.values()])  # noqa: E731
    difference = (flat(reference["micro_batch_mean"]) - flat(reference["token_mean"])).norm()
    assert difference > 0.1 * flat(reference["token_mean"]).norm()
    assert losses(tmp_path / "run")[1] == pytest.approx(reference["token_mean_loss"], rel=1e-5)


@pytest.mark.slow
def test_single_process_trains_checkpoints_and_exports(tmp_path, shards):
    import torch

    from llark.model import load_pretrained
    from llark.model.llark import read_projector

    out = tmp_path / "run"
    run_train(out, shards, **{"optim.max_steps": 12, "save_every": 6})
    curve = losses(out)
    assert sorted(curve) == list(range(1, 13))
    first, last = sum(curve[s] for s in (1, 2, 3)) / 3, sum(curve[s] for s in (10, 11, 12)) / 3
    assert last < first - 0.5, curve
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["tokens_per_s"] > 0 and metrics["samples_per_s"] > 0 and metrics["lr"] > 0
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000006", "step_00000012"]
    final = out / "checkpoints" / "step_00000012"
    for name in ("trainer_state.json", "rank_00000.json", "projector.safetensors", "llark_config.json"):
        assert (final / name).is_file()
    model, tokenizer, config = load_pretrained(out / "final", dtype="float32")
    assert config.encoder["dim"] == DIM and config.encoder["name"] == "features"
    torch.testing.assert_close(model.projector.weight, read_projector(final / "projector.safetensors")["weight"])
    assert (out / "final" / "model.safetensors").stat().st_size > 100_000


@pytest.mark.slow
def test_resume_after_kill_gives_the_same_loss_curve(tmp_path, shards):
    steps = 10
    straight = tmp_path / "straight"
    run_train(straight, shards, **{"optim.max_steps": steps, "export": False})
    killed = tmp_path / "killed"
    kill_when_logged([sys.executable, "-m", "llark.train"]
                     + train_args(killed, shards, **{"optim.max_steps": steps, "export": False}), killed / "metrics.jsonl", 5)
    resumed_from = max(int(p.name.split("_")[1]) for p in (killed / "checkpoints").glob("step_*")
                       if (p / "trainer_state.json").is_file())
    assert 2 <= resumed_from < steps
    result = run_train(killed, shards, **{"optim.max_steps": steps, "export": False})
    assert f"resuming at step {resumed_from}" in result.stdout
    assert losses(killed) == losses(straight)  # exact: weights, optimizer, schedule, data and RNG restored


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_processes_zero2(tmp_path, shards, dtype):
    import torch
    from safetensors import safe_open

    out = tmp_path / "ddp"
    result = run_train(out, shards, nproc=2, timeout=400,
                       **{"optim.max_steps": 10, "save_every": 10, "data.num_workers": 1, "model.dtype": dtype})
    assert f"2 processes, global batch 4 = micro-batch 2 x grad-accum 1 x world size 2; ZeRO-2, {dtype}" in result.stdout
    assert result.stdout.count("train: on CPU, ") == 1  # whether retain_freed_cpu_memory took effect or not: once, by rank 0
    curve = losses(out)
    assert sorted(curve) == list(range(1, 11))
    assert sum(curve[s] for s in (8, 9, 10)) < sum(curve[s] for s in (1, 2, 3)) - 1.0, curve
    checkpoint = out / "checkpoints" / "step_00000010"
    for rank in (0, 1):
        state = json.loads((checkpoint / f"rank_{rank:05d}.json").read_text())
        assert state["loader"]["positions"]
    with safe_open(str(out / "final" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {getattr(torch, dtype)}
    if dtype == "bfloat16":
        # bf16 weights, and each rank's partition of the fp32 master copy that the optimizer updates.
        masters = 0
        for rank in (0, 1):
            (optim,) = checkpoint.glob(f"bf16_zero_pp_rank_{rank}_*optim_states.pt")
            groups = torch.load(optim, weights_only=False)["optimizer_state_dict"]["single_partition_of_fp32_groups"]
            assert all(g.dtype == torch.float32 for g in groups)
            masters += sum(g.numel() for g in groups)
        counts = result.stdout.split("trainable parameters: projector ")[1].split(";")[0]  # "1,088, LM 163,264"
        trained = sum(int(n.replace(",", "")) for n in counts.split(", LM "))
        assert trained <= masters < trained + 64  # partitions are padded for alignment


@pytest.mark.slow
def test_qlora_trains_resumes_exactly_and_exports_full_precision_weights(tmp_path, shards):
    """model.quantization 4bit + LoRA (bitsandbytes runs NF4 on CPU too). Checkpoints hold the trained weights
    only; a resume continues the loss curve exactly (LoRA dropout included); the export is the base LM read
    again in full precision with the adapters merged, loadable without bitsandbytes."""

    import torch
    from safetensors.torch import load_file

    from llark.model import load_pretrained

    settings = {"model.mode": "lora", "model.quantization": "4bit", "model.lora.r": 4, "optim.max_steps": 8,
                "save_every": 4, "data.num_workers": 0}
    straight = tmp_path / "straight"
    result = run_train(straight, shards, **settings)
    assert "mode lora (LM in 4bit)" in result.stdout
    curve = losses(straight)
    assert curve[8] < curve[1], curve

    saved = torch.load(straight / "checkpoints" / "step_00000008" / "mp_rank_00_model_states.pt",
                       weights_only=False)["module"]
    assert any(".lora_A." in k for k in saved) and "projector.weight" in saved
    assert not any(k.endswith("embed_tokens.weight") or k.endswith("base_layer.weight") for k in saved)

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000008")
    shutil.rmtree(resumed / "final")
    metrics = (resumed / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("".join(m + "\n" for m in metrics if json.loads(m)["step"] <= 4))
    result = run_train(resumed, shards, **{**settings, "output_dir": str(resumed)})
    assert "resuming at step 4" in result.stdout
    assert losses(resumed) == curve

    config = json.loads((straight / "final" / "config.json").read_text())
    assert "quantization_config" not in config
    base = load_file(str(tiny_lm_dir() / "model.safetensors"))
    exported = load_file(str(straight / "final" / "model.safetensors"))
    prefix = "lm.base_model.model.model.layers.0.self_attn.q_proj."
    a, b = saved[prefix + "lora_A.default.weight"].float(), saved[prefix + "lora_B.default.weight"].float()
    update = exported["model.layers.0.self_attn.q_proj.weight"] - base["model.layers.0.self_attn.q_proj.weight"]
    assert update.abs().max() > 1e-3
    torch.testing.assert_close(update, (16 / 4) * b @ a, rtol=0, atol=1e-6)  # lora alpha / r
    model, _, _ = load_pretrained(straight / "final", dtype="float32")
    assert type(model.lm.model.layers[0].self_attn.q_proj) is torch.nn.Linear


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["projector", "lora"])
def test_projector_only_and_lora_modes_train(tmp_path, shards, mode):
    from llark.model import load_pretrained

    out = tmp_path / mode
    result = run_train(out, shards, **{"model.mode": mode, "model.gradient_checkpointing": True,
                                       "optim.max_steps": 8, "save_every": 8, "model.lora.r": 4})
    lm_params = int(result.stdout.split("LM ")[1].split(";")[0].replace(",", ""))
    assert (lm_params == 0) if mode == "projector" else (0 < lm_params < 163_264)
    curve = losses(out)
    assert curve[8] < curve[1], curve
    model, _, _ = load_pretrained(out / "final", dtype="float32")
    assert model.projector.in_features == DIM


def test_memory_plan():
    from llark.model.memory import MODELS, GB, plan_memory

    shape = MODELS["llama2-7b"]
    z2 = plan_memory(shape, zero_stage=2, micro_batch=1, seq_len=1024, gpus=4)
    z3 = plan_memory(shape, zero_stage=3, micro_batch=1, seq_len=1024, gpus=4)
    assert z2.parts["weights"] == pytest.approx(2 * (shape.params + 4800 * 4096 + 4096))
    assert z3.parts["weights"] == pytest.approx(z2.parts["weights"] / 4)
    assert z2.parts["optimizer"] == pytest.approx(12 * z2.trained_params / 4)
    # The fp32 gradient partition the step reads, and DeepSpeed's default reduction bucket of 5e8 bf16 elements.
    assert z2.parts["buffers"] == pytest.approx(4 * z2.trained_params / 4 + 2 * 5e8)
    overlap = plan_memory(shape, zero_stage=2, micro_batch=1, seq_len=1024, gpus=4, overlap_comm=True)
    assert overlap.parts["buffers"] - z2.parts["buffers"] == pytest.approx(2 * 5e8)
    # ZeRO-3 gathers its largest module (the 32000 x 4096 embedding) and prefetches the next.
    assert z3.parts["buffers"] - z2.parts["buffers"] == pytest.approx(2 * (32_000 * 4096 + 5e7))
    qlora = plan_memory(shape, zero_stage=2, micro_batch=1, seq_len=1024, gpus=1, mode="lora", quantization="4bit")
    assert qlora.total < 24 * GB < z2.total
    offload = plan_memory(shape, zero_stage=2, gpus=4, offload_optimizer=True)
    assert offload.parts["optimizer"] == 0 and offload.cpu_bytes == pytest.approx(16 * offload.trained_params / 4)
    assert offload.parts["buffers"] == pytest.approx(2 * 5e8)
    with pytest.raises(ValueError, match="ZeRO-3"):
        plan_memory(shape, zero_stage=2, offload_params=True)
    # The loss's logits exist at the supervised positions only: with Qwen's 152k vocabulary at 4 x 2048 tokens,
    # all positions would take 10 x 4 x 2048 x 152064 bytes (11.6 GB); 128 answer tokens take 16 times less.
    qwen = MODELS["qwen2.5-7b"]
    assert plan_memory(qwen, micro_batch=4, seq_len=2048).parts["logits"] == pytest.approx(10 * 4 * 128 * 152_064)
    assert plan_memory(qwen, micro_batch=4, seq_len=64).parts["logits"] == pytest.approx(10 * 4 * 64 * 152_064)


def test_model_shape_from_a_hugging_face_config():
    from llark.model.memory import shape_from_hf_config

    llama2_7b = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 32,
                 "intermediate_size": 11008, "num_hidden_layers": 32, "vocab_size": 32000, "tie_word_embeddings": False}
    assert shape_from_hf_config(llama2_7b).params == 6_738_415_616  # Llama-2-7b's published count
    tiny = json.loads((tiny_lm_dir() / "config.json").read_text())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir()))
    assert shape_from_hf_config(tiny).params == sum(p.numel() for p in model.parameters())


def test_memory_plan_reads_the_launch_deepspeed_configs(capsys):
    from llark.cli import main
    from llark.model.memory import deepspeed_settings

    assert deepspeed_settings(REPO / "launch" / "zero2.json") == {
        "zero_stage": 2, "offload_optimizer": False, "offload_params": False, "reduce_bucket_size": 5e8,
        "overlap_comm": False, "prefetch_bucket_size": 5e7}
    z3 = deepspeed_settings(REPO / "launch" / "zero3_offload.json")
    assert z3["zero_stage"] == 3 and z3["offload_optimizer"] and z3["offload_params"] and z3["overlap_comm"]
    assert main(["plan", "--deepspeed", str(REPO / "launch" / "zero3_offload.json"), "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("llama2-7b, ZeRO-3, offloaded: optimizer and parameters, mode full")
    assert "GB of host memory per GPU" in out
    assert main(["plan", "--deepspeed", str(REPO / "launch" / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_launch_scripts_parse():
    for script in ("multinode.sh", "slurm.sbatch"):
        assert subprocess.run(["bash", "-n", str(REPO / "launch" / script)]).returncode == 0
    import yaml

    acc = yaml.safe_load((REPO / "launch" / "accelerate_config.yaml").read_text())
    assert acc["distributed_type"] == "DEEPSPEED"
    assert (REPO / acc["deepspeed_config"]["deepspeed_config_file"]).is_file()
