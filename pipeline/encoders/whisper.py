"""The ``whisper`` encoder: Whisper's audio encoder (tiny 4 × 384 ... large-v3 32 × 1280), 16 kHz in, 50 Hz out.

Whisper's checkpoints (``openai/whisper-tiny`` ... ``openai/whisper-large-v3``) are transformers'
own ``WhisperForConditionalGeneration`` (keys ``model.encoder.*``) or ``WhisperModel`` (keys
``encoder.*``). Only the encoder is built and loaded: transformers' ``WhisperEncoder`` from the
encoder's fields of ``config.json`` (``model_type: whisper``), with the tensors under
``model.encoder.`` / ``encoder.``; the decoder and ``proj_out`` are never read.

Input: the checkpoint's own ``WhisperFeatureExtractor`` (``preprocessor_config.json``) turns each
window into its log-mel spectrogram (80 bins, 128 for large-v3; it must agree with ``config.json``'s
``num_mel_bins``). Windows are 30 s, fixed by the model: its ``max_source_positions`` (1500)
frames × the second convolution's stride 2 × the extractor's hop (160 samples); the last window is
zero-padded to 30 s, as Whisper is trained, and only its frames that start inside the audio are
kept (a window of ``n`` samples keeps ``ceil(n / 320)`` frames; frame ``j`` starts at ``j / 50`` s).
``--layers``: hidden states 0 (the convolutions' output plus the positional embedding) to 4 ... 32,
the last with the encoder's final layer norm (transformers' ``last_hidden_state``); default
``last``, the encoder output SALMONN and Qwen2-Audio read.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.encoders import pretrained
from pipeline.encoders.pretrained import (
    COMMON_OPTIONS,
    PretrainedEncoder,
    WindowModel,
    check_checkpoint_dir,
    missing_files_message,
    parse_frame_rate,
    parse_layers,
    read_json_file,
)
from pipeline.runner import StageConfigError

NAME = "whisper"
SAMPLE_RATE = 16_000
WHAT = "a Whisper checkpoint (openai/whisper-tiny ... openai/whisper-large-v3)"
DEFAULT_OPTIONS = {**COMMON_OPTIONS, "layers": "last"}
# WhisperEncoder's convolutions: conv1 stride 1, conv2 stride 2 (fixed in its code, not configured).
CONV_STRIDE = 2
# The config.json fields WhisperEncoder reads (dropouts and layerdrop are set to 0: inference).
ENCODER_FIELDS = ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "num_mel_bins",
                  "max_source_positions", "activation_function", "scale_embedding")
ENCODER_PREFIXES = ("model.encoder.", "encoder.")


def encoder_config(raw: dict[str, Any]):
    """The ``WhisperConfig`` of a checkpoint's encoder; refuses a config.json of another model."""
    from transformers import WhisperConfig

    if raw.get("model_type") != "whisper":
        raise StageConfigError(f"--weights-dir: config.json has model_type {raw.get('model_type')!r}, not a Whisper "
                               "checkpoint (whisper)")
    kept = {k: raw[k] for k in ENCODER_FIELDS if k in raw}
    return WhisperConfig(**kept, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0)


def feature_extractor(directory: Path, n_mels: int):
    """The checkpoint's ``WhisperFeatureExtractor``; refuses another extractor or another mel count."""
    from transformers import WhisperFeatureExtractor

    path = directory / "preprocessor_config.json"
    if not path.is_file():
        raise StageConfigError(missing_files_message(NAME, WHAT, directory))
    raw = read_json_file(path)
    kind = raw.get("feature_extractor_type", "WhisperFeatureExtractor")
    if kind != "WhisperFeatureExtractor":
        raise StageConfigError(f"--weights-dir: preprocessor_config.json has feature_extractor_type {kind!r}, not "
                               "WhisperFeatureExtractor")
    extractor = WhisperFeatureExtractor.from_pretrained(str(directory))
    if getattr(extractor, "dither", 0.0):  # random noise added to every window: frames would differ run to run
        raise StageConfigError(f"--weights-dir: preprocessor_config.json sets dither: {extractor.dither}; the frames "
                               "must not depend on random noise (set it to 0.0)")
    if extractor.feature_size != n_mels:
        raise StageConfigError(f"--weights-dir: preprocessor_config.json has feature_size {extractor.feature_size} "
                               f"(mel bins) but config.json has num_mel_bins {n_mels}; they must agree")
    return extractor


def read_checkpoint(directory: Path):
    """``(encoder config, feature extractor)`` of a checkpoint directory, checked against each other."""
    config = encoder_config(read_json_file(directory / "config.json"))
    return config, feature_extractor(directory, config.num_mel_bins)


def geometry(config, extractor) -> dict[str, Any]:
    """Sample rate, window length (samples), samples per encoder frame and the native frame rate."""
    rate = int(extractor.sampling_rate)
    hop = int(extractor.hop_length)
    frame = hop * CONV_STRIDE  # 320 samples at 16 kHz: 20 ms
    return {"sample_rate": rate, "hop_length": hop, "frame_samples": frame,
            "window_samples": config.max_source_positions * frame, "native": rate / frame}


def rename_key(key: str) -> str | None:
    """A checkpoint key → ``WhisperEncoder``'s; None for the decoder, ``proj_out`` and the rest."""
    for prefix in ENCODER_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return None


def check_options(options: dict[str, Any], devices_here: bool = True) -> dict[str, Any]:
    opts = pretrained.check_common_options(NAME, options, DEFAULT_OPTIONS, devices_here)
    directory = check_checkpoint_dir(NAME, WHAT, opts["weights_dir"])
    config, extractor = read_checkpoint(directory)
    layers = parse_layers(opts["layers"], config.encoder_layers + 1)
    frame_rate = parse_frame_rate(opts["frame_rate"], geometry(config, extractor)["native"])
    return {**opts, "weights_dir": str(directory), "layers": layers.manifest_value,
            "frame_rate": "native" if frame_rate is None else frame_rate}


def describe(options: dict[str, Any]) -> dict[str, Any]:
    directory = Path(options["weights_dir"])
    config, extractor = read_checkpoint(directory)
    shape = geometry(config, extractor)
    frame_rate = None if options["frame_rate"] == "native" else float(options["frame_rate"])
    window_s = shape["window_samples"] / shape["sample_rate"]
    return {
        "name": NAME,
        "layer": parse_layers(options["layers"], config.encoder_layers + 1).manifest_value,
        "frame_rate_hz": frame_rate or shape["native"],
        "dim": config.d_model,
        "config": {
            "model": f"whisper encoder {config.encoder_layers} layers x {config.d_model}",
            "checkpoint": pretrained.checkpoint_identity(directory),
            "sample_rate": shape["sample_rate"],
            "hidden_states": config.encoder_layers + 1,
            "window_s": window_s,
            "native_frame_rate_hz": shape["native"],
            "n_mels": config.num_mel_bins,
            "pooling": "mean of the frames that start in each output frame" if frame_rate else "none",
            "input": f"mono, resampled with soxr HQ, level as recorded; each window zero-padded to {window_s:g} s "
                     f"and turned into the checkpoint's {config.num_mel_bins}-bin log-mel spectrogram "
                     "(WhisperFeatureExtractor); frames past the audio's end dropped",
        },
        "packages": pretrained.PACKAGES,
    }


def load_model(directory: Path, device: str, compute_dtype: str):
    """``WhisperEncoder`` with the checkpoint's encoder weights, in eval mode on ``device``."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = encoder_config(read_json_file(directory / "config.json"))
    model = pretrained.load_module(WhisperEncoder, config, directory, rename_key, device, compute_dtype)
    strides = model.conv1.stride[0] * model.conv2.stride[0]
    if strides != CONV_STRIDE:  # transformers changed WhisperEncoder: the frame timing below would be wrong
        raise RuntimeError(f"WhisperEncoder's convolutions stride {strides}, expected {CONV_STRIDE}")
    return model


def build(options: dict[str, Any]) -> PretrainedEncoder:
    import torch

    directory, description, device, model = pretrained.load_for_build(options, describe, load_model)
    config = model.config
    _, extractor = read_checkpoint(directory)
    shape = geometry(config, extractor)
    rate, window, frame = shape["sample_rate"], shape["window_samples"], shape["frame_samples"]
    dtype = pretrained.torch_dtype(options["compute_dtype"])

    def hidden_states(windows: np.ndarray, first: int, last: int, frames: int) -> np.ndarray:
        # Every window padded (with zeros) to exactly the 2 × max_source_positions mel frames the encoder takes.
        features = extractor([w for w in windows], sampling_rate=rate, padding="max_length", max_length=window,
                             truncation=True, return_tensors="np", device=device)["input_features"]
        x = torch.from_numpy(np.ascontiguousarray(features)).to(device=device, dtype=dtype)
        with torch.inference_mode():
            return pretrained.stacked_states(model(x, output_hidden_states=True).hidden_states, first, last, frames)

    window_model = WindowModel(
        sample_rate=rate, window_samples=window, frame_period_s=frame / rate, hidden_states=hidden_states,
        valid_frames=lambda n: math.ceil(n / frame), min_samples=1,
    )
    return pretrained.make_encoder(options, description, window_model)


# ---------------------------------------------------------------------------------------------
# A tiny random stand-in in the published layout (tests and `make demo ENCODER=whisper`)

TINY = {"d_model": 32, "encoder_layers": 2, "decoder_layers": 1, "encoder_attention_heads": 2,
        "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "vocab_size": 100,
        "max_source_positions": 1500, "max_target_positions": 32, "pad_token_id": 99, "bos_token_id": 98,
        "eos_token_id": 99, "decoder_start_token_id": 97, "begin_suppress_tokens": None}


def write_random_checkpoint(directory: Path, seed: int = 0, num_mel_bins: int = 80, **overrides) -> Path:
    """A random ``WhisperForConditionalGeneration`` saved as Hugging Face publishes Whisper
    (config.json, generation_config.json, model.safetensors with ``model.encoder.*`` keys) and its
    ``WhisperFeatureExtractor`` (preprocessor_config.json) with ``num_mel_bins`` bins."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(WhisperConfig(**{**TINY, "num_mel_bins": num_mel_bins, **overrides}))
    model.eval().save_pretrained(str(directory))
    WhisperFeatureExtractor(feature_size=num_mel_bins).save_pretrained(str(directory))
    return directory
