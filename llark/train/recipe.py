"""The training recipe: ``__init__`` validates the config against the launcher's processes and the
shards, ``setup`` builds the parts in dependency order, ``train`` runs the loop, ``save_checkpoint``
writes an exactly resumable checkpoint, ``export`` writes the final Hugging Face directory and
``cleanup`` closes what was opened."""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llark.host_memory import RetainedHeap
from llark.multi_encoder import to_device
from llark.train.checkpoint import (
    checkpoint_path, checkpoint_to_resume, load_trained_weights, read_trainer_state, remove_old_checkpoints,
    restore_rank_state, save_rank_state, save_trainer_state, seed_all,
)
from llark.train.config import TrainConfig, TrainConfigError, check_run_settings
from llark.train.distributed import (
    check_shared_directory, deepspeed_config, distributed_env, launcher_deepspeed_config,
)
from llark.train.metrics import TENSORBOARD_SCALARS, MetricsLog
from llark.train.optimizer import lr_multiplier, parameter_groups
from llark.train.stages import mark_stage_done, run_stages
from pipeline.files import write_json

if TYPE_CHECKING:
    from llark.data import LoaderState

log = logging.getLogger("llark")



class TrainRecipe:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.local_rank, self.world_size = distributed_env()
        self.is_main = self.rank == 0  # logs, metrics, shared files
        self.retained_heap: RetainedHeap | None = None
        self.grad_accum = cfg.grad_accum_for(self.world_size)
        self.ds_config = deepspeed_config(cfg, self.grad_accum, self.world_size, launcher_deepspeed_config())
        self.zero_stage = int(self.ds_config["zero_optimization"].get("stage", 0))
        check_run_settings(cfg, self.world_size, self.zero_stage)
        if cfg.model.dtype == "bfloat16" and not torch.cuda.is_available():
            log.warning("bf16 on CPU is slow; the CPU demo config uses model.dtype: float32")
        self._check_data()
        self._check_chat_template()
        self.output_dir = Path(cfg.output_dir)
        self.step = 0
        self.best_validation = math.inf
        self.mixture_drawn: Counter = Counter()  # examples drawn per mixture stream in this process's run
        self.metrics: MetricsLog | None = None  # rank 0's
        self.validation_llark = None  # the model as validation.tasks asks it, made at the first validation

    def gpu_memory_warning(self, encoder_dim: int, gpu_bytes: float) -> str | None:
        """Before any weight loads: what ``llark plan`` says of this run when it will not fit a GPU of
        ``gpu_bytes`` (an estimate, so a warning, not a refusal)."""
        from llark.model.memory import GB, plan_memory, shape_from_hf_config, zero_settings

        cfg = self.cfg
        try:
            shape = shape_from_hf_config(json.loads((self.base_lm_dir / "config.json").read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError):
            return None  # not a Llama-like config.json: loading it says what is wrong
        plan = plan_memory(shape, micro_batch=cfg.micro_batch, seq_len=cfg.data.max_seq_len, gpus=self.world_size,
                           mode=cfg.model.mode, lora_rank=cfg.model.lora.r, encoder_dim=encoder_dim,
                           quantization=cfg.model.quantization,
                           gradient_checkpointing=cfg.model.gradient_checkpointing,
                           connector=cfg.model.connector.settings(), **zero_settings(self.ds_config))
        if plan.total <= 0.95 * gpu_bytes:
            return None
        parts = ", ".join(f"{name} {value / GB:.1f}" for name, value in plan.parts.items())
        return (f"estimated {plan.total / GB:.1f} GB per GPU ({parts}), and this GPU has {gpu_bytes / GB:.1f} GB: "
                f"expect out-of-memory. `llark plan` compares settings: ZeRO-3 or offload (deepspeed=launch/"
                f"zero3.json, *_offload.json), more GPUs, a smaller micro_batch or data.max_seq_len, model.mode: lora")

    def _check_data(self) -> None:
        """The shards exist and their encoder fits the projector: refused here, before any weight loads."""
        from llark.data import check_encoder, open_shards
        from llark.mixture import mixture_cells
        from llark.model import LlarkConfig

        cfg = self.cfg
        d = cfg.data
        self.shards = open_shards(d.shards, d.split, sorted(d.mixture) if d.mixture else d.task_families)
        self.mixture = mixture_cells(self.shards, d.mixture, d.dataset_weights) if (
            d.mixture or d.dataset_weights) else {}
        self.validation_shards = None
        self.trained = None  # model.init_from's llark_config.json
        if cfg.validation.every:
            from pipeline.encoders import describe_differences, manifest_differences

            v = cfg.validation
            self.validation_shards = open_shards(v.shards or cfg.data.shards, v.split, cfg.data.task_families)
            if differences := manifest_differences(self.shards.manifest, self.validation_shards.manifest):
                raise TrainConfigError("validation.shards hold embeddings of another encoder than data.shards: "
                                       + describe_differences(differences))
            if v.tasks:
                from llark.evaluate.run import EvalConfigError, build_items, read_embedding_index

                try:
                    self.validation_items = build_items(Path(v.clips), Path(v.embeddings), v.tasks, [v.split],
                                                        limit=v.max_clips)
                    _, embedded = read_embedding_index(Path(v.embeddings))
                except (EvalConfigError, OSError) as exc:
                    raise TrainConfigError(f"validation.tasks: {exc}") from None
                if differences := manifest_differences(self.shards.manifest, embedded):
                    raise TrainConfigError("validation.embeddings are of another encoder than data.shards: "
                                           + describe_differences(differences))
        from llark.multi_encoder import select_for_run

        if cfg.model.init_from:
            self.trained = LlarkConfig.from_file(Path(cfg.model.init_from) / "llark_config.json")
        self.encoders = select_for_run(cfg, self.shards, self.validation_shards, self.trained)
        if cfg.model.init_from:
            trained = self.trained
            if cfg.model.frame_pool and cfg.model.frame_pool != trained.frame_pool:
                raise TrainConfigError(f"model.frame_pool ({cfg.model.frame_pool}) differs from model.init_from's "
                                       f"({trained.frame_pool}); leave it unset to continue with the trained one")
            if "connector" in cfg.model.model_fields_set and cfg.model.connector.settings() != trained.connector:
                raise TrainConfigError(f"model.connector ({cfg.model.connector.settings()}) differs from model.init_from's "
                                       f"({trained.connector}); leave it unset to continue with the trained one")
            if cfg.model.encoder_dim and cfg.model.encoder_dim != trained.encoder_dim:
                raise TrainConfigError(f"model.encoder_dim ({cfg.model.encoder_dim}) differs from the projector of "
                                       f"model.init_from ({trained.encoder_dim})")
            if not self.encoders.fusion:
                check_encoder(self.shards.manifest, trained.encoder_dim, trained.encoder)
        elif cfg.model.encoder_dim and not self.encoders.fusion:
            check_encoder(self.shards.manifest, cfg.model.encoder_dim)

    @property
    def base_lm_dir(self) -> Path:
        """The language model this run starts from: model.init_from's when set (its LM is the earlier
        stage's), else model.lm_path's."""
        from llark.model.llark import resolve_lm_path

        m = self.cfg.model
        return Path(m.init_from) if m.init_from else resolve_lm_path(m.lm_path)

    def _check_chat_template(self) -> None:
        """A whole conversation rendered, tokenized and labelled with the LM's own tokenizer and chat
        template, as training and inference will: a template that cannot work is refused here, by name."""
        from llark.model import AUDIO_TOKEN, ChatFormatError, ChatFormatter, load_tokenizer
        from llark.model.llark import check_model_dir

        m = self.cfg.model
        lm_dir = self.base_lm_dir
        if m.init_from:
            trained = self.trained  # read by _check_data
            for name in ("system_prompt", "end_of_turn"):
                ours, theirs = getattr(m, name), getattr(trained, name)
                if ours is not None and ours != theirs:
                    raise TrainConfigError(f"model.{name} ({ours!r}) differs from model.init_from's ({theirs!r}); "
                                           "the exported model answers with its own: leave it unset to continue")
            system_prompt, end_of_turn, audio_token = trained.system_prompt, trained.end_of_turn, trained.audio_token
        else:
            system_prompt, end_of_turn, audio_token = m.system_prompt, m.end_of_turn, AUDIO_TOKEN
        check_model_dir(lm_dir)
        try:
            formatter = ChatFormatter(load_tokenizer(lm_dir, audio_token), end_of_turn, audio_token)
            formatter.check(system_prompt, multi_turn=self.cfg.data.conversation == "multi_turn")
        except ChatFormatError as exc:
            raise TrainConfigError(f"model.lm_path: {exc}") from None
        folded = " (it has no system role: the system prompt opens the first user turn)" if (
            system_prompt and not formatter.traits.system_role) else ""
        self._print(f"train: {formatter.template}; turns end with {formatter.end_of_turn!r}{folded}")

    # -- setup --------------------------------------------------------------------------------

    def setup(self) -> None:
        """Each step uses what the steps before it built."""
        cfg = self.cfg
        self._setup_distributed()  # everything after this may use collectives
        seed_all(cfg.seed)  # the same on every rank while the model is built
        self._warn_if_over_gpu_memory()
        checkpoint = checkpoint_to_resume(cfg.resume, self.output_dir)
        self._setup_model(new_projector=checkpoint is None)
        seed_all(cfg.seed + self.rank)  # dropout differs across ranks
        self._setup_engine()
        # Weights, optimizer, schedule, data position and RNG, before the loader starts reading.
        positions = self._load_checkpoint(checkpoint) if checkpoint is not None else None
        self._setup_data(positions)
        self._setup_logging(resumed=checkpoint is not None)

    def _setup_distributed(self) -> None:
        """This rank's device, CPU heap and process group; the check that output_dir is shared."""
        import deepspeed

        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            if self.cfg.tf32:
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
        elif self.cfg.retain_freed_cpu_memory:
            self.retained_heap = RetainedHeap.enable()
            self._print("train: on CPU, freed buffers stay in this process's heap (retain_freed_cpu_memory), so "
                        "DeepSpeed's per-step gradient buffers are not page-faulted back in at every step"
                        if self.retained_heap else
                        "train: on CPU, this C library returns freed buffers to the OS whatever it is told "
                        "(retain_freed_cpu_memory had no effect), so DeepSpeed's per-step gradient buffers are "
                        "page-faulted back in at every step")
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        check_shared_directory(self.output_dir)

    @property
    def _encoder_dim(self) -> int:
        """The projector's input: model.encoder_dim, else the shards' (opened and checked in __init__)."""
        if self.encoders.fusion:
            return sum(self.encoders.dims.values())
        return self.cfg.model.encoder_dim or self.shards.manifest["dim"]

    def _warn_if_over_gpu_memory(self) -> None:
        if torch.cuda.is_available() and self.is_main:
            warning = self.gpu_memory_warning(self._encoder_dim,
                                              torch.cuda.get_device_properties(self.local_rank).total_memory)
            if warning:
                log.warning(warning)

    def _setup_model(self, new_projector: bool) -> None:
        """Model, tokenizer and chat formatter; the encoder check runs before any weight is trained. A run
        that resumes loads its projector from the checkpoint, so only a new one is initialised here."""
        from llark.data import check_encoder
        from llark.model import ChatFormatter, LlarkConfig, build_llark, configure_training, load_pretrained
        from llark.model.llark import LoraSettings

        m, manifest = self.cfg.model, self.shards.manifest
        model_kwargs = dict(dtype=m.dtype, attn_implementation=m.attn_implementation)
        if m.init_from:
            model, tokenizer, _ = load_pretrained(m.init_from, quantization=m.quantization, **model_kwargs)
            if not self.encoders.fusion:
                check_encoder(manifest, model.projector.in_features, model.config.encoder)
        else:
            if not self.encoders.fusion:
                check_encoder(manifest, self._encoder_dim)
            llark_cfg = LlarkConfig(lm_path=m.lm_path, encoder_dim=self._encoder_dim, system_prompt=m.system_prompt,
                                    end_of_turn=m.end_of_turn, frame_pool=m.frame_pool or 1,
                                    connector=self.encoders.connector_settings(m.connector.settings()),
                                    audio_states=self.shards.states)
            model, tokenizer = build_llark(llark_cfg, quantization=m.quantization, **model_kwargs)
            if m.projector_init == "standardise" and new_projector:
                self._standardise_projector(model)
        model.config.encoder = self.encoders.encoder_identity()
        configure_training(model, m.mode, LoraSettings(**m.lora.model_dump()), m.gradient_checkpointing)
        if m.compile:
            from llark.model.compile import compile_decoder_layers

            layers = compile_decoder_layers(model.lm)
            self._print(f"train: model.compile: the LM's {len(layers)} decoder layers ({type(layers[0]).__name__}) "
                        "are compiled one by one with torch.compile (inductor); the first steps are slower while "
                        "they compile, and the audio splicing and the loss run uncompiled")
        self.model, self.tokenizer = model, tokenizer
        self.formatter = ChatFormatter(tokenizer, model.config.end_of_turn, model.config.audio_token)

    def _setup_engine(self) -> None:
        """The DeepSpeed engine: its optimizer over the trainable parameters only, our warmup + cosine schedule."""
        import deepspeed

        o, model = self.cfg.optim, self.model
        trainable = parameter_groups(model, o)
        schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
            opt, lambda s: lr_multiplier(s, o.warmup_steps, o.max_steps, o.min_lr_ratio))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=trainable, config=self.ds_config, lr_scheduler=schedule)

    def _setup_data(self, positions: LoaderState | None) -> None:
        """This rank's share of the shards, from the resumed position if any."""
        from dataclasses import replace

        from llark.data import ExampleEncoder, LoaderState, ShardStream, StreamSettings, make_loader
        from llark.mixture import MixtureStream

        cfg, d, model = self.cfg, self.cfg.data, self.model
        encode = self.encoders.examples(ExampleEncoder(self.formatter, model.projector.in_features, d.max_seq_len,
                                                       model.config.system_prompt, model.config.frame_pool,
                                                       model.config.audio_tokens, model.config.audio_states))
        settings = StreamSettings(
            micro_batch=cfg.micro_batch, pad_id=self.tokenizer.pad_token_id, seed=cfg.seed, rank=self.rank,
            world_size=self.world_size, num_workers=d.num_workers, group_shards=d.group_shards,
            buffer_size=d.shuffle_buffer, conversation=d.conversation, on_bad_sample=d.on_bad_sample,
            on_too_long=d.on_too_long, pad_to_multiple_of=d.pad_to_multiple_of, questions=d.questions,
            start=positions.positions if positions else {}, rotation=positions.rotation if positions else 0)
        if self.mixture:
            cells = {name: ShardStream(urls, encode, replace(settings, start={}), share_shards=True)
                     for name, (urls, _) in self.mixture.items()}
            stream = MixtureStream(cells, {name: w for name, (_, w) in self.mixture.items()}, settings)
        else:
            stream = ShardStream(self.shards.urls, encode, settings)
        self.loader_state = positions or LoaderState(d.num_workers)
        self.loader = make_loader(stream)
        if self.validation_shards is not None:
            from llark.train.validation import Validator

            self.validator = Validator(self.validation_shards.urls, stream.encode, self.tokenizer.pad_token_id,
                                       cfg.micro_batch, cfg.validation.max_examples, d.conversation, self.rank,
                                       self.world_size)

    def _setup_logging(self, resumed: bool) -> None:
        """On rank 0: the run's config.json, TensorBoard, W&B and the run's summary."""
        if not self.is_main:
            return
        cfg, model = self.cfg, self.model
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.output_dir / "config.json", cfg.model_dump(mode="json"))
        self.metrics = MetricsLog(cfg, self.output_dir)
        counts = model.trainable_counts()
        mode = cfg.model.mode + (f" (LM in {cfg.model.quantization})" if cfg.model.quantization else "")
        self._print(
            f"train: {self.world_size} processes, global batch {cfg.global_batch} = micro-batch "
            f"{cfg.micro_batch} x grad-accum {self.grad_accum} x world size {self.world_size}; "
            f"ZeRO-{self.zero_stage}, {cfg.model.dtype}, mode {mode}; peak LR {cfg.optim.lr:g}"
            f" (projector {cfg.optim.projector_lr or cfg.optim.lr:g}); {model.config.frame_pool} encoder "
            f"frame(s) per audio token\n"
            f"train: trainable parameters: projector {counts['projector']:,}, LM {counts['lm']:,}; "
            f"data: {self.shards.samples:,} samples in {len(self.shards.urls)} shards "
            f"({self.encoders.describe()}); "
            f"{cfg.optim.max_steps * cfg.global_batch / max(1, self.shards.samples):.2f} passes over the samples "
            f"in {cfg.optim.max_steps:,} steps" + (f"; resuming at step {self.step}" if resumed else ""))

    def _standardise_projector(self, model) -> None:
        """Every rank reads the same first samples and seeds the same generator: identical weights."""
        from llark.data import frame_statistics
        from llark.model.llark import standardise_projector, token_embedding_std

        m = self.cfg.model
        if self.encoders.reads_members:
            mean, std, samples = self.encoders.statistics(self.shards.urls, model.config.frame_pool,
                                                          m.projector_init_samples)
        else:
            mean, std, samples = frame_statistics(self.shards.urls, model.projector.in_features,
                                                  model.config.frame_pool, m.projector_init_samples,
                                                  model.config.audio_states)
        token_std = token_embedding_std(model.lm)
        standardise_projector(model.projector, mean, std, token_std, seed=self.cfg.seed)
        self._print(f"train: projector initialised from the frame statistics of {samples} samples (frames: mean "
                    f"|mean| {np.abs(_flat(mean)).mean():.3g}, mean std {_flat(std).mean():.3g}; audio tokens scaled to the token "
                    f"embeddings' std {token_std:.3g})")

    # -- training -------------------------------------------------------------------------------

    def train(self) -> None:
        cfg, engine = self.cfg, self.engine
        batches = iter(self.loader)
        window = _new_window()
        t_last = time.perf_counter()
        engine.train()
        while self.step < cfg.optim.max_steps:
            micro_batches = [next(batches) for _ in range(self.grad_accum)]
            # The loss of a step is the mean over every supervised token of the global batch (all
            # micro-batches on all ranks): each token weighs the same, whichever micro-batch holds it.
            n_tokens = self._all_ranks_sum(sum(b["supervised"] for b in micro_batches))
            step_loss = torch.zeros((), dtype=torch.float64, device=engine.device)
            for batch in micro_batches:
                self.loader_state.update(batch)
                inputs = {k: to_device(batch[k], engine.device)
                          for k in ("input_ids", "attention_mask", "audio", "audio_frames", "labels")}
                _, loss = engine(**inputs, loss_denominator=n_tokens)
                # The data-parallel reduction averages gradients over ranks; scaling by the world size
                # (and not letting DeepSpeed divide by the accumulation steps) makes the step's gradient
                # that of the summed token losses over n_tokens.
                engine.backward(loss * self.world_size, scale_wrt_gas=False)
                engine.step()
                step_loss += loss.detach()
                window["tokens"] += batch["tokens"]
                window["samples"] += len(batch["keys"])
                window["skipped"] += batch["skipped"]
                window["too_long"] += batch["too_long"]
                window["dropped_turns"] += batch["dropped_turns"]
                window["mixture"].update(batch.get("mixture") or {})
            self.step += 1
            if self.retained_heap and self.retained_heap.after_step():
                print(f"train: rank {self.rank}: the heap grew at each of the last {self.retained_heap.patience} "
                      "steps, so freed buffers were not being reused; returned them to the OS and went back to "
                      "the C library's defaults (retain_freed_cpu_memory)", flush=True)
                self.retained_heap = None
            window["loss"] += step_loss  # this rank's share of the step's mean; _log sums over ranks
            window["steps"] += 1
            if self.step % cfg.log_every == 0 or self.step == cfg.optim.max_steps:
                self._log(window, time.perf_counter() - t_last)
                window = _new_window()
                t_last = time.perf_counter()
            v = cfg.validation
            if v.every and (self.step % v.every == 0 or self.step == cfg.optim.max_steps):
                self.validate()
                engine.train()
                t_last = time.perf_counter()
            if self.step % cfg.save_every == 0 or self.step == cfg.optim.max_steps:
                self.save_checkpoint()
                t_last = time.perf_counter()

    def validate(self) -> float:
        """The validation loss (and task scores), logged; see llark/train/validation.py."""
        from llark.train.validation import validate

        return validate(self)

    def _all_ranks_sum(self, count: int) -> int:
        import torch.distributed as dist

        total = torch.tensor([count], dtype=torch.int64, device=self.engine.device)
        dist.all_reduce(total)
        return max(1, int(total.item()))

    def _log(self, window: dict[str, Any], seconds: float) -> None:
        import torch.distributed as dist

        # One all-reduce: the per-token mean loss (each rank holds its share of it) and summed
        # tokens/samples over ranks.
        streams = sorted(self.mixture)  # the mixture's streams: families, datasets or both
        totals = torch.tensor([float(window["loss"]) / window["steps"], window["tokens"], window["samples"],
                               window["skipped"], window["too_long"], window["dropped_turns"],
                               *(window["mixture"][f] for f in streams)],
                              dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(totals)
        drawn = {f: int(n) for f, n in zip(streams, totals[6:].tolist())}
        self.mixture_drawn.update(drawn)
        loss = totals[0].item()
        o = self.cfg.optim
        multiplier = lr_multiplier(self.step - 1, o.warmup_steps, o.max_steps, o.min_lr_ratio)
        metrics = {
            "step": self.step, "loss": loss, "lr": o.lr * multiplier, "projector_lr": (o.projector_lr or o.lr) * multiplier,
            "grad_norm": _float(self.engine.get_global_grad_norm()),
            "tokens_per_s": totals[1].item() / seconds, "samples_per_s": totals[2].item() / seconds,
            "skipped_samples": int(totals[3].item()), "too_long_samples": int(totals[4].item()),
            "dropped_turns": int(totals[5].item()),
        }
        if streams:
            metrics["mixture"] = {f: n / max(1, sum(drawn.values())) for f, n in drawn.items()}
        if self.cfg.stage is not None:
            metrics["stage"] = self.cfg.stage
        if not self.is_main:
            return
        self.metrics.write(metrics, {f"train/{k}": metrics[k] for k in TENSORBOARD_SCALARS}
                           | {f"mixture/{k}": v for k, v in metrics.get("mixture", {}).items()})
        gn = metrics["grad_norm"]
        lr = (f"lr {metrics['lr']:.3e}" if self.cfg.model.mode != "projector" else "")
        if self.cfg.model.mode == "projector" or o.projector_lr:
            lr = f"{lr} projector lr {metrics['projector_lr']:.3e}".strip()
        self._print(f"step {self.step}/{o.max_steps} loss {loss:.4f} {lr} "
                    f"grad-norm {gn if gn is None else f'{gn:.3f}'} {metrics['tokens_per_s']:.0f} tokens/s "
                    f"{metrics['samples_per_s']:.2f} samples/s" + "".join(
                        f"; {metrics[k]} {words}" for k, words in (
                            ("skipped_samples", "bad samples skipped"), ("too_long_samples", "samples over max_seq_len "
                             "skipped"), ("dropped_turns", "turns dropped to fit max_seq_len")) if metrics[k])
                    + (f"; mixture {self._describe_mixture(drawn)}" if streams else ""))
        if streams and self.step == o.max_steps:
            self._print(f"train: realised mixture over the {sum(self.mixture_drawn.values()):,} examples of this run: "
                        + self._describe_mixture(self.mixture_drawn))

    def _describe_mixture(self, drawn: dict[str, int]) -> str:
        asked = {name: weight for name, (_, weight) in self.mixture.items()}
        total, weights = max(1, sum(drawn.values())), sum(asked.values())
        return ", ".join(f"{f} {drawn.get(f, 0) / total:.1%} (asked {asked[f] / weights:.1%})" for f in sorted(asked))

    def _print(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    # -- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Every rank writes its part; rank 0 writes trainer_state.json last, after a barrier."""
        import torch.distributed as dist

        from llark.model.llark import LLARK_CONFIG, PROJECTOR_FILE, save_projector

        path = checkpoint_path(self.output_dir, self.step)
        self.engine.save_checkpoint(str(path.parent), tag=path.name, save_latest=False,
                                    exclude_frozen_parameters=self._saves_trained_weights_only)
        save_rank_state(path, self.rank, self.loader_state)
        projector = self._gathered_projector()
        if self.is_main:
            save_projector(projector, path / PROJECTOR_FILE)
            (path / LLARK_CONFIG).write_text(self.model.config.to_json(), encoding="utf-8")
        dist.barrier()
        if self.is_main:
            save_trainer_state(path, self.step, self.world_size, self.cfg, best_validation=None if math.isinf(self.best_validation) else self.best_validation)
            remove_old_checkpoints(self.output_dir, self.cfg.keep_checkpoints)
            self._print(f"checkpoint: {path}")
        dist.barrier()
        return path

    @property
    def _saves_trained_weights_only(self) -> bool:
        """With the LM frozen (projector or LoRA mode) its weights are read from model.lm_path again on resume,
        so checkpoints hold only what is trained: for a 7B LM, megabytes instead of 13 GB each. A 4-bit or
        8-bit LM could not be loaded back from its own state dict anyway. ZeRO-3 keeps DeepSpeed's own format."""
        return self.cfg.model.mode != "full" and self.zero_stage < 3

    def _gathered_projector(self) -> dict[str, torch.Tensor]:
        from llark.model.llark import projector_state

        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.projector.parameters()), modifier_rank=None):
                return projector_state(self.model)
        return projector_state(self.model)

    def _load_checkpoint(self, path: Path) -> LoaderState:
        state = read_trainer_state(path, self.world_size, self.cfg)
        load_path, _ = self.engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True,
            custom_load_fn=load_trained_weights if self._saves_trained_weights_only else None)
        if load_path is None:
            raise TrainConfigError(f"resume: DeepSpeed could not load {path}")
        positions = restore_rank_state(path, self.rank, self.cfg.data.num_workers)
        self.step = state["step"]
        self.best_validation = state.get("best_validation") or math.inf
        return positions

    # -- export ---------------------------------------------------------------------------------

    def export(self, out: Path | None = None) -> Path | None:
        """The model as a Hugging Face directory (safetensors) with the projector and llark_config.json, in
        ``out`` (default: the final model's directory)."""
        from llark.model import export_pretrained

        out = out or self.cfg.final_dir
        lm_state = None
        if self.zero_stage == 3:
            full = self.engine._zero3_consolidated_16bit_state_dict()  # on rank 0; needs the gather flag
            if self.is_main:
                lm_state = {k[len("lm."):]: v for k, v in full.items() if k.startswith("lm.")}
        projector = self._gathered_projector()
        if self.is_main:
            lm = self.model.lm
            if self.cfg.model.quantization:
                from llark.model.llark import merge_adapters_into_full_precision

                self._print(f"export: merging the LoRA adapters into {self.base_lm_dir} read again "
                            f"in {self.cfg.model.dtype} (not into its {self.cfg.model.quantization} copy)")
                lm = merge_adapters_into_full_precision(lm, self.base_lm_dir, self.cfg.model.dtype)
            elif self.cfg.model.mode == "lora":
                lm = lm.merge_and_unload()
            export_pretrained(out, lm, self.tokenizer, self.model.config, projector, lm_state=lm_state)
            self._print(f"export: {out} (load it with llark.model.load_pretrained, or `llark ask`)")
        import torch.distributed as dist

        dist.barrier()
        return out if self.is_main else None

    def cleanup(self, end_process_group: bool = True) -> None:
        """Close the logs; end the process group unless another stage follows in this process."""
        if self.metrics is not None:
            self.metrics.close()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            if end_process_group:
                dist.destroy_process_group()


def _new_window() -> dict[str, Any]:
    return {"loss": 0.0, "steps": 0, "tokens": 0, "samples": 0, "skipped": 0, "too_long": 0, "dropped_turns": 0,
            "mixture": Counter()}


def _flat(x) -> np.ndarray:
    """Frame statistics, one array or one per encoder, as one array."""
    return np.concatenate(list(x.values())) if isinstance(x, dict) else x


def _float(x) -> float | None:
    if x is None:
        return None
    return float(x.item() if torch.is_tensor(x) else x)


def main(cfg: TrainConfig) -> None:
    """One run, or each of its stages in turn (llark/train/stages.py)."""
    if cfg.stages:
        run_stages(cfg, run_one)
    else:
        run_one(cfg, last=True)


def run_one(cfg: TrainConfig, last: bool = True) -> None:
    recipe = TrainRecipe(cfg)
    recipe.setup()
    recipe.train()
    if cfg.export:
        recipe.export()
    if cfg.stage is not None and recipe.is_main:
        mark_stage_done(cfg, recipe.step)
    recipe.cleanup(end_process_group=last)
    del recipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
