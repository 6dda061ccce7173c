"""Answering questions about audio with a trained LLark model: loading, encoding, generation.

A trained model is the directory ``llark train`` exports (``final/``): a Hugging Face model,
``projector.safetensors`` and ``llark_config.json``, whose ``encoder`` field names the encoder the
projector was trained on (name, layer, frame rate, dimension, dtype, configuration).
:func:`load` rebuilds the model; :func:`build_encoder_for` builds that encoder and refuses one
whose identity differs.

Audio longer than one encoder window (25 s, the crop the model was trained on) is cut into
consecutive windows from ``start_s``, up to ``max_seconds``; each window is encoded on its own
(as the crop stage and the embed stage do with a clip) and the frames are concatenated in time
order, so the model sees ``ceil(seconds * frame_rate)`` frames::

    audio    |------------------------------------------------------------- ... -|
    windows  [0 s ........ 25 s)[25 s ....... 50 s)[50 s .. 60 s)        (max_seconds = 60)
    frames   250 frames          250 frames          100 frames   -> [600, dim]

A last window shorter than ``MIN_WINDOW_S`` is dropped (unless it is the only one). Frames are
rounded through the dtype the training embeddings were stored in (float16 by default), so the
projector sees the same values it was trained on.

Generation is greedy unless ``do_sample`` (then ``temperature`` and ``top_p``, seeded). Prompts
of a batch are left-padded; each row carries its own number of audio frames.

:class:`Answerer` answers :class:`Request` s (a question about an audio file or precomputed frames)
in batches, each audio file encoded once and each frames file read once, for ``llark ask`` and
anything else that serves questions.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from llark.errors import LlarkConfigError

WINDOW_S = 25.0
MIN_WINDOW_S = 1.0
DEFAULT_MAX_SECONDS = WINDOW_S


class InferenceError(LlarkConfigError):
    """A model, encoder or input that cannot be used as asked; the message says what to do."""


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise InferenceError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.do_sample and (self.temperature <= 0 or not 0 < self.top_p <= 1):
            raise InferenceError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {self.temperature}, "
                                 f"{self.top_p}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Llark:
    """A loaded model with its tokenizer and chat formatter; :meth:`answer` generates answers."""

    def __init__(self, model, tokenizer, config, device: str = "cpu", source: str | None = None):
        from llark.model.chat import ChatFormatter

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.device = device
        self.source = source
        self.formatter = ChatFormatter(tokenizer, config.end_of_turn, config.audio_token)

    @property
    def encoder_identity(self) -> dict[str, Any] | None:
        return self.config.encoder

    @property
    def fusion(self) -> bool:
        """A connector of several encoders: audio is ``{encoder: [frames, dim]}``."""
        return isinstance(self.config.encoder, list)

    @property
    def encoder_dim(self) -> int:
        if self.fusion:
            raise InferenceError(f"{self.source} reads several encoders ({', '.join(self.encoder_dims)}): give an audio "
                                 "file, which is encoded with each")
        return int(self.model.projector.in_features)

    @property
    def audio_states(self) -> int | None:
        """Hidden states per frame the model mixes (``--layers all``); None for ``[frames, dim]``."""
        return self.config.audio_states

    @property
    def frame_shape(self) -> str:
        return f"[frames, {self.audio_states}, {self.encoder_dim}]" if self.audio_states else \
            f"[frames, {self.encoder_dim}]"

    @property
    def encoder_dims(self) -> dict[str, int]:
        return {e["key"]: int(e["dim"]) for e in self.config.encoder} if self.fusion else {None: self.encoder_dim}

    @property
    def storage_dtype(self) -> np.dtype:
        """The dtype the training embeddings were stored in (frames are rounded through it)."""
        encoder = self.config.encoder or {}
        name = (encoder[0] if isinstance(encoder, list) else encoder).get("dtype", "float32")
        return np.dtype(name if name in ("float16", "float32") else "float32")

    def prompt_ids(self, question: str, n_frames: int | dict[str, int]) -> list[int]:
        return self.formatter.encode_prompt(self.formatter.prompt(question, self.config.system_prompt),
                                            self.config.audio_tokens(n_frames))

    def _batch_audio(self, audios: Sequence[Any]):
        """Right-padded ``[batch, frames, dim]`` and frame counts: one tensor, or a dict by encoder."""
        if not self.fusion:
            frames = max(a.shape[0] for a in audios)
            audio = torch.zeros((len(audios), frames, *audios[0].shape[1:]), dtype=torch.float32)
            for i, a in enumerate(audios):
                audio[i, : a.shape[0]] = torch.from_numpy(a.astype(np.float32))
            return audio, torch.tensor([a.shape[0] for a in audios], dtype=torch.long)
        padded, counts = {}, {}
        for name in self.encoder_dims:
            padded[name], counts[name] = Llark._batch_audio(_OneEncoder(self.encoder_dims[name]),
                                                            [a[name] for a in audios])
        return padded, counts

    @torch.inference_mode()
    def answer(self, questions: Sequence[str], audios: Sequence[np.ndarray],
               settings: GenerationSettings = GenerationSettings()) -> list[str]:
        """One answer per (question, audio frames ``[frames, dim]``, or ``[frames, states, dim]`` for a
        model that mixes stored states), generated as one batch."""
        from llark.model.llark import pool_frames

        if len(questions) != len(audios):
            raise InferenceError(f"{len(questions)} questions but {len(audios)} audio arrays")
        if not questions:
            return []
        dims = self.encoder_dims
        for audio in audios:
            if not self.fusion:
                per_frame = (self.audio_states, self.encoder_dim) if self.audio_states else (self.encoder_dim,)
                if audio.shape[1:] != per_frame or audio.shape[0] < 1:
                    raise InferenceError(f"audio frames of shape {audio.shape}; this model takes {self.frame_shape}")
                continue
            for name, a in audio.items():
                if name not in dims or a.ndim != 2 or a.shape[1] != dims[name] or a.shape[0] < 1:
                    raise InferenceError(f"audio frames of shape {a.shape} from encoder {name!r}; this model takes "
                                         f"[frames, {dims.get(name)}]")
            missing = [name for name in dims if name not in audio]
            if missing:
                raise InferenceError(f"no frames of encoder {missing[0]!r}, which this model reads")
        # Rounded through the training storage dtype, then pooled, as the training loader does.
        store = lambda a: pool_frames(np.asarray(a).astype(self.storage_dtype), self.config.frame_pool)  # noqa: E731
        audios = [{n: store(a[n]) for n in dims} if self.fusion else store(a) for a in audios]
        prompts = [self.prompt_ids(q, {n: x.shape[0] for n, x in a.items()} if self.fusion else a.shape[0])
                   for q, a in zip(questions, audios)]
        length = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(prompts), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, length - len(p):] = torch.tensor(p)
            attention_mask[i, length - len(p):] = 1
        audio, audio_frames = self._batch_audio(audios)
        kwargs: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample,
            "eos_token_id": self.formatter.end_of_turn_id, "pad_token_id": pad,
        }
        if settings.do_sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
            torch.manual_seed(settings.seed)
        else:
            # Greedy decoding: clear sampling defaults a generation_config may carry.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if _distributed_world_size() > 1:
            # Under ZeRO-3 every rank must run the same number of forward passes, or generate() hangs
            # when the ranks' answers end at different lengths.
            kwargs["synced_gpus"] = True
        from llark.model.connectors import audio_to

        out = self.model.generate(input_ids.to(self.device), audio_to(audio, self.device), audio_to(audio_frames, self.device),
                                  attention_mask=attention_mask.to(self.device), **kwargs)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out.cpu()]


class _OneEncoder:
    """What ``Llark._batch_audio`` needs of a one-encoder model, for padding one encoder's frames."""

    fusion = False

    def __init__(self, dim: int):
        self.encoder_dim = dim


def _distributed_world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def load(checkpoint: str | os.PathLike, dtype: str = "auto", device: str | None = None) -> Llark:
    """An exported model directory (``llark train``'s ``final/``) ready to answer.

    ``dtype`` ``auto`` is float32 on CPU (bf16 matmuls are slow on most CPUs) and bfloat16 on CUDA.
    """
    from llark.model.llark import ModelConfigError, load_pretrained

    device = device or default_device()
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    try:
        model, tokenizer, config = load_pretrained(checkpoint, dtype=dtype)
    except ModelConfigError as exc:
        raise InferenceError(str(exc)) from None
    return Llark(model.to(device), tokenizer, config, device=device, source=str(checkpoint))


# ---------------------------------------------------------------------------------------------
# Encoding audio files


def build_encoder_for(llark: Llark, options: dict[str, Any] | None = None):
    """The encoder the model was trained on, built with ``options`` (e.g. Jukebox's weights_dir);
    InferenceError when the model names none or the built one differs from it; ``{name: encoder}``
    for a model of several encoders (:func:`build_encoders_for`)."""
    identity = llark.encoder_identity
    if isinstance(identity, list):
        return build_encoders_for(llark, options)
    return build_encoder_from(identity, options, llark.source)


def build_encoder_from(identity: dict[str, Any] | None, options: dict[str, Any] | None, source: Any):
    """The encoder of ``identity`` (a model's record of it), built with ``options``; refused when it differs."""
    from pipeline.encoders import (FRAME_FIELDS, build_encoder, check_encoder_options, describe_differences,
                                   describe_encoder, encoder_module, manifest_differences)
    from pipeline.runner import StageConfigError

    if not identity or "name" not in identity:
        raise InferenceError(f"{source}: llark_config.json names no encoder; it cannot encode audio files "
                             "(pass precomputed frames instead)")
    options = dict(options or {})
    try:
        # The layers and frame rate the model was trained on, unless the caller names them (checked below).
        accepted = getattr(encoder_module(identity["name"]), "DEFAULT_OPTIONS", {})
        if "layers" in accepted and identity.get("layer") is not None:
            options.setdefault("layers", identity["layer"])
        if "frame_rate" in accepted and identity.get("frame_rate_hz"):
            options.setdefault("frame_rate", identity["frame_rate_hz"])
        checked = check_encoder_options(identity["name"], options)
        description = describe_encoder(identity["name"], checked)
    except StageConfigError as exc:
        message = str(exc)
        if message.startswith("--weights-dir"):
            message += " (here: --encoder-option weights_dir=DIR)"
        raise InferenceError(message) from None
    differences = manifest_differences(identity, description, FRAME_FIELDS)
    if differences:
        raise InferenceError("the encoder differs from the one the model was trained on (trained on != this "
                             "encoder): " + describe_differences(differences))
    return build_encoder(identity["name"], checked)


def build_encoders_for(llark: Llark, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{name: encoder}`` for a model of several encoders, each built with its own options
    (``NAME.KEY=VALUE``, e.g. ``mert.weights_dir=DIR``) and checked against the one it was trained on."""
    names = [entry.get("key") for entry in llark.encoder_identity]
    scoped: dict[str, dict[str, Any]] = {name: {} for name in names}
    for key, value in (options or {}).items():
        name, dot, option = key.partition(".")
        if not dot or name not in scoped:
            raise InferenceError(f"encoder option {key!r}: this model reads the encoders {', '.join(names)}; name the "
                                 f"one it is for, as NAME.{option if dot else key}=VALUE (e.g. {names[-1]}.weights_dir=DIR)")
        scoped[name][option] = value
    encoders = {}
    for entry in llark.encoder_identity:
        name = entry.get("key")
        try:
            encoders[name] = build_encoder_from(entry, scoped[name], llark.source)
        except InferenceError as exc:
            message = str(exc).replace("--encoder-option ", f"--encoder-option {name}.")
            raise InferenceError(f"encoder {name!r}: {message}") from None
    return encoders


def windows(duration_s: float, start_s: float = 0.0, max_seconds: float = DEFAULT_MAX_SECONDS,
            window_s: float = WINDOW_S, min_window_s: float = MIN_WINDOW_S) -> list[tuple[float, float]]:
    """Consecutive ``window_s`` windows of ``[start_s, min(duration_s, start_s + max_seconds))``."""
    if max_seconds <= 0 or window_s <= 0:
        raise InferenceError(f"max_seconds and the window must be positive, got {max_seconds}, {window_s}")
    if not 0 <= start_s < duration_s:
        raise InferenceError(f"start {start_s} s is outside the audio (0 to {duration_s:.2f} s)")
    end = min(duration_s, start_s + max_seconds)
    count = max(1, math.ceil((end - start_s) / window_s - 1e-9))
    out = [(start_s + k * window_s, min(end, start_s + (k + 1) * window_s)) for k in range(count)]
    if len(out) > 1 and out[-1][1] - out[-1][0] < min_window_s:
        out.pop()
    return out


def encode_file(path: str | os.PathLike, encoder, start_s: float = 0.0,
                max_seconds: float = DEFAULT_MAX_SECONDS) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """``[frames, dim]`` frames of ``path`` (its windows encoded one by one, concatenated; an encoder
    that keeps every hidden state gives ``[frames, states, dim]``) and the windows; with
    ``{name: encoder}``, ``{name: [frames, dim]}``."""
    from pipeline.audio import TARGET_SAMPLE_RATE, AudioChecks, AudioError, probe, read_window

    checks = AudioChecks(silence_dbfs=-float("inf"), min_duration_s=0.1)  # a quiet window is still music
    try:
        info = probe(path, checks)
        spans = windows(info.duration_s, start_s, max_seconds)
        parts = []
        for a, b in spans:
            audio = read_window(info, a, b, target_sample_rate=TARGET_SAMPLE_RATE, checks=checks)
            if isinstance(encoder, dict):
                parts.append({name: np.asarray(e.encode(audio, TARGET_SAMPLE_RATE), dtype=np.float32)
                              for name, e in encoder.items()})
            else:
                frames = np.asarray(encoder.encode(audio, TARGET_SAMPLE_RATE), dtype=np.float32)
                parts.append(frames.transpose(1, 0, 2) if frames.ndim == 3 else frames)  # stored [states, frames, dim]
    except AudioError as exc:
        raise InferenceError(str(exc)) from None
    if isinstance(encoder, dict):
        return {name: np.concatenate([p[name] for p in parts], axis=0) for name in encoder}, spans
    return np.concatenate(parts, axis=0), spans


def read_frames(path: str | os.PathLike, dim: int, states: int | None = None) -> np.ndarray:
    """A precomputed ``[frames, dim]`` .npy (no pickles), or, with ``states``, one stored as the
    embed stage stores every hidden state (``[states, frames, dim]``), returned ``[frames, states, dim]``."""
    array = np.load(Path(path), allow_pickle=False)
    stored = (states, dim) if states else (dim,)
    shape_ok = array.ndim == len(stored) + 1 and array.shape[-1] == dim and array.shape[-2] >= 1 and \
        (not states or array.shape[0] == states)
    if not shape_ok or not np.isfinite(array).all():
        expected = f"[{states}, frames, {dim}]" if states else f"[frames, {dim}]"
        raise InferenceError(f"{path}: frames of shape {array.shape} ({array.dtype}); expected finite {expected}")
    return array.transpose(1, 0, 2) if states else array


# ---------------------------------------------------------------------------------------------
# Answering requests


@dataclass(frozen=True)
class Request:
    """One question about one audio file (encoded with the model's encoder) or precomputed frames (.npy)."""

    question: str
    audio: str | None = None
    frames: str | None = None

    def __post_init__(self):
        if not isinstance(self.question, str) or not self.question.strip() or \
                (self.audio is None) == (self.frames is None):
            raise InferenceError("needs a question and one of audio or frames")

    @property
    def source(self) -> tuple[str, str]:
        """``("frames", path)`` or ``("audio", path)``."""
        return ("frames", self.frames) if self.frames is not None else ("audio", self.audio)


class Answerer:
    """Answers requests with a loaded model, ``batch_size`` questions generated together. Every audio
    file is encoded once (the encoder, the one the model was trained on, is built on first need,
    with ``encoder_options``) and every frames file read once, however many questions ask about it."""

    def __init__(self, llark: Llark, encoder_options: dict[str, Any] | None = None, start_s: float = 0.0,
                 max_seconds: float = DEFAULT_MAX_SECONDS, batch_size: int = 8):
        self.llark = llark
        self.encoder_options = dict(encoder_options or {})
        self.start_s, self.max_seconds, self.batch_size = start_s, max_seconds, batch_size
        self._encoder = None
        self._frames: dict[tuple[str, str], tuple[np.ndarray, list[tuple[float, float]] | None]] = {}

    def frames(self, request: Request) -> tuple[np.ndarray, list[tuple[float, float]] | None]:
        """The request's ``[frames, dim]`` and the windows encoded (None for a frames file)."""
        kind, path = request.source
        if (kind, path) not in self._frames:
            if kind == "frames":
                self._frames[kind, path] = (read_frames(path, self.llark.encoder_dim, self.llark.audio_states), None)
            else:
                if self._encoder is None:
                    self._encoder = build_encoder_for(self.llark, self.encoder_options)
                self._frames[kind, path] = encode_file(path, self._encoder, self.start_s, self.max_seconds)
        return self._frames[kind, path]

    def answer(self, requests: Sequence[Request], settings: GenerationSettings = GenerationSettings()) -> list[dict]:
        """One result per request, in order: its source, question, answer, frame count, windows, model
        and generation settings. Every input is read before the first answer is generated."""
        for request in requests:
            self.frames(request)
        results = []
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start:start + self.batch_size]
            encoded = [self.frames(r) for r in batch]
            answers = self.llark.answer([r.question for r in batch], [frames for frames, _ in encoded], settings)
            for request, (frames, spans), answer in zip(batch, encoded, answers):
                kind, path = request.source
                results.append({
                    kind: path, "question": request.question, "answer": answer,
                    "frames": {n: int(a.shape[0]) for n, a in frames.items()} if isinstance(frames, dict)
                    else int(frames.shape[0]),
                    "windows": [[round(a, 3), round(b, 3)] for a, b in spans] if spans else None,
                    "model": str(self.llark.source), "generation": settings.to_dict(),
                })
        return results
