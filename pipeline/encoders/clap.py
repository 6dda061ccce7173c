"""The ``clap`` encoder: LAION CLAP's HTSAT audio tower, time-resolved (768 or 1024 dims), 48 kHz in, 3.2 Hz out.

LAION's CLAP checkpoints as transformers reads them (``laion/clap-htsat-unfused``,
``laion/clap-htsat-fused``: HTSAT depths 2-2-6-2, 768 wide; ``laion/larger_clap_music``,
``laion/larger_clap_music_and_speech``: depths 2-2-12-2, 1024 wide) are a ``ClapModel``
(``config.json`` with ``model_type: clap`` and an ``audio_config``; keys ``audio_model.*`` for the
audio tower). Only the audio tower is built and loaded: transformers' ``ClapAudioModel`` from
``audio_config``, with the tensors under ``audio_model.``; the text tower, the two projections and
the logit scales are never read. The window-attention index tables and the BatchNorm batch
counters are computed, not learned: they are taken from the checkpoint when it holds them and
computed when it does not (every other weight must be there, of its shape).

Input: windows of 10 s (the checkpoint's ``ClapFeatureExtractor``: ``max_length_s`` × 48 kHz; not
an option), the last one zero-padded to 10 s here, so the extractor always receives exactly
``max_length`` samples and neither pads, repeats nor crops (a longer input would be cropped at
random). The extractor's own ``truncation`` is used (``fusion`` for fused checkpoints: four copies
of the one log-mel view, torchaudio-style mel filters; ``rand_trunc`` for unfused ones: one view,
librosa-style filters). ``is_longer`` is False for every window, as none is longer than 10 s: the
extractor (like LAION's own HTSAT forward) marks one window of a batch at random as longer when
none is, a training device that would make a window's frames depend on its batch and on the random
state (and sends a lone clip through the fusion branch with three copies of itself: this encoder's
frames of a fused checkpoint are those of its global branch alone); that mark is dropped and
numpy's global random state is restored after each call.

Output: ``ClapAudioEncoder``'s ``last_hidden_state`` (after the final LayerNorm), ``[batch,
channels, 2, 32]``, averaged over its two frequency bins (the lower and upper half of the mel
bands) to 32 frames a window, in chronological order. The order follows from the code:
``reshape_mel2img`` resizes the 1001 mel frames to 1024 and cuts them into 4 consecutive chunks
of 256 stacked along the image's height (chunk ``k``, mel bin ``f`` at row ``64k + f``, time within
the chunk along the width); after the 4 × 4 patches and three 2 × 2 merges, row ``h`` of the 8 × 8
token grid holds chunk ``h // 2`` and mel half ``h % 2``, column ``w`` the resized frames
``32w .. 32w + 31`` of that chunk; the final reshape/permute puts ``h % 2`` on axis 2 and
``8 (h // 2) + w`` on axis 3, so index ``j`` of the time axis covers resized frames ``32j .. 32j + 31``
(tests check it on a click). The time steps come from ``audio_config`` (``freq_ratio`` × ``spec_size`` /
2^(stages - 1) / ``patch_stride``: 4 × 256 / 8 / 4 = 32), so frame ``j`` starts at ``j × 0.3125`` s
(the 1001 → 1024 resize puts it at ``j × 0.31281`` s of audio: 10 ms late at the last frame). The
last stage attends over the whole window, so every frame sees all 10 s; frames that start past the
audio's end are dropped (a window of ``n`` samples keeps ``ceil(n / 15000)``). The pooled CLAP
embedding (``pooler_output``) is the mean of a full window's 32 frames.

There is one hidden state (HTSAT's earlier stages have other widths and resolutions):
``--layers`` takes ``last`` (the default) or ``0``. ``--frame-rate``: the native 3.2 Hz by default,
or any lower rate.
"""

from __future__ import annotations

import json
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

NAME = "clap"
SAMPLE_RATE = 48_000
WHAT = "a CLAP checkpoint with the HTSAT audio tower (e.g. laion/clap-htsat-unfused, laion/larger_clap_music)"
DEFAULT_OPTIONS = {**COMMON_OPTIONS, "layers": "last"}
PREFIX = "audio_model."
# Computed buffers a checkpoint may or may not hold (taken from it when there, computed otherwise).
DERIVED = ("relative_position_index", "num_batches_tracked")
# transformers' ClapAudioModel builds one fusion module, LAION's AFF-2D (None reads the same).
FUSION_TYPES = (None, "aff_2d")


def audio_config(raw: dict[str, Any]):
    """The ``ClapAudioConfig`` of a CLAP ``config.json``; refuses another model or an unusable geometry."""
    from transformers import ClapAudioConfig

    if raw.get("model_type") != "clap":
        raise StageConfigError(f"--weights-dir: config.json has model_type {raw.get('model_type')!r}, not a CLAP "
                               "checkpoint (clap, with an audio_config)")
    fields = raw.get("audio_config")
    if not isinstance(fields, dict):
        raise StageConfigError("--weights-dir: config.json has no audio_config object; a CLAP checkpoint "
                               "(ClapModel) describes its HTSAT audio tower there")
    try:
        # Inference: no dropout, no stochastic depth.
        config = ClapAudioConfig.from_dict({**fields, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                                            "drop_path_rate": 0.0})
    except Exception as exc:  # transformers' strict dataclass validation
        raise StageConfigError(f"--weights-dir: config.json's audio_config is not a valid ClapAudioConfig "
                               f"({type(exc).__name__}: {exc})") from None
    if config.enable_fusion and config.fusion_type not in FUSION_TYPES:
        raise StageConfigError(f"--weights-dir: config.json's audio_config sets fusion_type: "
                               f"{json.dumps(config.fusion_type)}; transformers' ClapAudioModel implements only aff_2d")
    if config.num_mel_bins < 1 or config.spec_size % config.num_mel_bins:
        raise StageConfigError(f"--weights-dir: config.json's audio_config has spec_size {config.spec_size} and "
                               f"num_mel_bins {config.num_mel_bins}; spec_size must be a multiple of num_mel_bins")
    return config


def pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def time_steps(config) -> tuple[int, int]:
    """``(time steps, frequency bins)`` of ``last_hidden_state`` for one window, from ``audio_config``
    as ``ClapAudioEncoder.forward`` computes them: (32, 2) for the published checkpoints."""
    ratio = config.spec_size // config.num_mel_bins
    merged = config.spec_size // 2 ** (len(config.depths) - 1)
    stride = pair(config.patch_stride)
    freq, temporal = merged // stride[0], merged // stride[1]
    return ratio * temporal, freq // ratio


def feature_extractor(directory: Path, config):
    """The checkpoint's ``ClapFeatureExtractor``; refuses another extractor, another mel count, a
    truncation that does not fit the model or windows the model cannot take."""
    from transformers import ClapFeatureExtractor

    path = directory / "preprocessor_config.json"
    if not path.is_file():
        raise StageConfigError(missing_files_message(NAME, WHAT, directory))
    raw = read_json_file(path)
    kind = raw.get("feature_extractor_type", "ClapFeatureExtractor")
    if kind != "ClapFeatureExtractor":
        raise StageConfigError(f"--weights-dir: preprocessor_config.json has feature_extractor_type {kind!r}, not "
                               "ClapFeatureExtractor")
    extractor = ClapFeatureExtractor.from_pretrained(str(directory))
    if extractor.feature_size != config.num_mel_bins:
        raise StageConfigError(f"--weights-dir: preprocessor_config.json has feature_size {extractor.feature_size} "
                               f"(mel bins) but config.json's audio_config has num_mel_bins {config.num_mel_bins}; "
                               "they must agree")
    wanted = "fusion" if config.enable_fusion else "rand_trunc"
    if extractor.truncation != wanted:
        raise StageConfigError(f"--weights-dir: preprocessor_config.json has truncation {extractor.truncation!r} but "
                               f"config.json's audio_config has enable_fusion {json.dumps(config.enable_fusion)}, "
                               f"which takes truncation {wanted!r}")
    ratio = config.spec_size // config.num_mel_bins
    mel_frames = int(extractor.nb_max_samples) // int(extractor.hop_length) + 1
    if mel_frames > config.spec_size * ratio:
        raise StageConfigError(f"--weights-dir: a {extractor.max_length_s} s window is {mel_frames} mel frames, more "
                               f"than the {config.spec_size * ratio} the audio tower takes "
                               f"(spec_size {config.spec_size})")
    steps, bins = time_steps(config)
    if steps < 1 or bins < 1:
        raise StageConfigError(f"--weights-dir: config.json's audio_config (spec_size {config.spec_size}, patch_stride "
                               f"{config.patch_stride}, depths {list(config.depths)}) leaves no time steps")
    return extractor


def read_checkpoint(directory: Path):
    """``(audio config, feature extractor)`` of a checkpoint directory, checked against each other."""
    config = audio_config(read_json_file(directory / "config.json"))
    return config, feature_extractor(directory, config)


def geometry(config, extractor) -> dict[str, Any]:
    """Sample rate, window (samples and seconds), time steps per window, frame period and native rate."""
    rate = int(extractor.sampling_rate)
    window = int(extractor.nb_max_samples)
    steps, bins = time_steps(config)
    window_s = window / rate
    return {"sample_rate": rate, "window_samples": window, "window_s": window_s, "steps": steps, "bins": bins,
            "frame_period_s": window_s / steps, "native": steps / window_s,
            "dim": int(config.patch_embeds_hidden_size * 2 ** (len(config.depths) - 1))}


def parse_clap_layers(value: Any):
    """``--layers``: ``last`` or ``0``, the one hidden state this encoder has."""
    text = str(value).strip().lower()
    if text not in ("last", "0"):
        raise StageConfigError(f"--layers {value}: the clap encoder has one hidden state, the audio tower's output "
                               "(choose last or 0); HTSAT's earlier stages have other widths and resolutions")
    return parse_layers(text, 1)


def rename_key(key: str) -> str | None:
    """A ``ClapModel`` key → ``ClapAudioModel``'s; None for the text tower, projections and logit scales."""
    return key[len(PREFIX):] if key.startswith(PREFIX) else None


def check_options(options: dict[str, Any], devices_here: bool = True) -> dict[str, Any]:
    opts = pretrained.check_common_options(NAME, options, DEFAULT_OPTIONS, devices_here)
    directory = check_checkpoint_dir(NAME, WHAT, opts["weights_dir"])
    config, extractor = read_checkpoint(directory)
    layers = parse_clap_layers(opts["layers"])
    frame_rate = parse_frame_rate(opts["frame_rate"], geometry(config, extractor)["native"])
    return {**opts, "weights_dir": str(directory), "layers": layers.manifest_value,
            "frame_rate": "native" if frame_rate is None else frame_rate}


def describe(options: dict[str, Any]) -> dict[str, Any]:
    directory = Path(options["weights_dir"])
    config, extractor = read_checkpoint(directory)
    shape = geometry(config, extractor)
    frame_rate = None if options["frame_rate"] == "native" else float(options["frame_rate"])
    views = "4 identical log-mel views (fusion)" if config.enable_fusion else "one log-mel view"
    pooling = f"mean of the {shape['bins']} frequency bins of each time step"
    if frame_rate:
        pooling += "; then the mean of the frames that start in each output frame"
    return {
        "name": NAME,
        "layer": parse_clap_layers(options["layers"]).manifest_value,
        "frame_rate_hz": frame_rate or shape["native"],
        "dim": shape["dim"],
        "config": {
            "model": f"clap htsat depths {json.dumps(list(config.depths), separators=(',', ':'))} x {shape['dim']}",
            "checkpoint": pretrained.checkpoint_identity(directory),
            "sample_rate": shape["sample_rate"],
            "hidden_states": 1,
            "window_s": shape["window_s"],
            "native_frame_rate_hz": shape["native"],
            "fusion": bool(config.enable_fusion),
            "pooling": pooling,
            "input": f"mono, resampled with soxr HQ, level as recorded; each window zero-padded to "
                     f"{shape['window_s']:g} s and turned into the checkpoint's {config.num_mel_bins}-bin log-mel "
                     f"spectrogram (ClapFeatureExtractor, truncation {extractor.truncation}: {views}), is_longer "
                     "false; frames past the audio's end dropped",
        },
        "packages": pretrained.PACKAGES,
    }


def derived_buffers(model) -> dict[str, Any]:
    """The buffers of a ``ClapAudioModel`` that are computed, not learned, as it computes them."""
    import torch
    from transformers.models.clap.modeling_clap import ClapAudioSelfAttention

    buffers = {}
    for name, module in model.named_modules():
        if isinstance(module, ClapAudioSelfAttention):
            buffers[f"{name}.relative_position_index"] = module.create_relative_position_index()
        elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.num_batches_tracked is not None:
            buffers[f"{name}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return buffers


def load_model(directory: Path, device: str, compute_dtype: str):
    """``ClapAudioModel`` with the checkpoint's audio tower, in eval mode on ``device``: built on the
    meta device, given the checkpoint's tensors (the computed buffers filled in where it lacks them);
    a missing, left-over or misshapen weight is refused."""
    from transformers import ClapAudioModel

    config = audio_config(read_json_file(directory / "config.json"))
    return pretrained.load_module(ClapAudioModel, config, directory, rename_key, device, compute_dtype,
                                  computed=derived_buffers)


def extract_features(extractor, windows: np.ndarray) -> np.ndarray:
    """The extractor's ``input_features`` ``[batch, views, mel frames, mel bins]`` of windows that are
    each exactly ``max_length`` samples long, with no randomness and numpy's random state left as it was."""
    window = int(extractor.nb_max_samples)
    if windows.ndim != 2 or windows.shape[1] != window:
        raise ValueError(f"expected windows of exactly {window} samples, got shape {windows.shape}")
    state = np.random.get_state()  # the extractor draws a random window to mark is_longer (dropped here)
    try:
        features = extractor([w for w in windows], sampling_rate=int(extractor.sampling_rate),
                             truncation=extractor.truncation, padding="pad", max_length=window,
                             return_tensors="np")["input_features"]
    finally:
        np.random.set_state(state)
    return np.ascontiguousarray(features, dtype=np.float32)


def build(options: dict[str, Any]) -> PretrainedEncoder:
    import torch

    directory, description, device, model = pretrained.load_for_build(options, describe, load_model)
    config = model.config
    _, extractor = read_checkpoint(directory)
    shape = geometry(config, extractor)
    window, steps, dim = shape["window_samples"], shape["steps"], shape["dim"]
    dtype = pretrained.torch_dtype(options["compute_dtype"])
    fusion = bool(config.enable_fusion)

    def hidden_states(windows: np.ndarray, first: int, last: int, frames: int) -> np.ndarray:
        if (first, last) != (0, 0):
            raise ValueError(f"the clap encoder has one hidden state (0), asked for {first}-{last}")
        x = torch.from_numpy(extract_features(extractor, windows)).to(device=device, dtype=dtype)
        extra = {"is_longer": torch.zeros((len(windows), 1), dtype=torch.bool, device=device)} if fusion else {}
        with torch.inference_mode():
            out = model(input_features=x, **extra).last_hidden_state  # [batch, dim, bins, steps]
            if tuple(out.shape[1:]) != (dim, shape["bins"], steps):  # transformers changed ClapAudioEncoder
                raise RuntimeError(f"ClapAudioModel gave last_hidden_state {tuple(out.shape)}, expected "
                                   f"[batch, {dim}, {shape['bins']}, {steps}]")
            frames_out = out.float().mean(dim=2).transpose(1, 2)[:, :frames]  # [batch, frames, dim]
            return frames_out.unsqueeze(1).cpu().numpy()

    window_model = WindowModel(
        sample_rate=shape["sample_rate"], window_samples=window, frame_period_s=shape["frame_period_s"],
        hidden_states=hidden_states, valid_frames=lambda n: max(1, -(-n * steps // window)), min_samples=window,
    )
    return pretrained.make_encoder(options, description, window_model)


# ---------------------------------------------------------------------------------------------
# A tiny random stand-in in the published layout (tests and `make demo ENCODER=clap`)

# A small HTSAT with the published geometry (spec_size 256, 64 mel bins, 4 stages: 32 steps a window).
TINY = {"patch_embeds_hidden_size": 16, "depths": [1, 1, 1, 1], "num_attention_heads": [1, 2, 4, 8],
        "window_size": 8}
TINY_TEXT = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 1,
             "intermediate_size": 32, "max_position_embeddings": 40}


def write_random_checkpoint(directory: Path, seed: int = 0, fusion: bool = False, safetensors: bool = True,
                            **overrides) -> Path:
    """A random ``ClapModel`` (tiny text tower, small HTSAT; ``overrides`` go to ``audio_config``) saved
    with ``save_pretrained`` (config.json, model.safetensors; ``pytorch_model.bin`` with the same keys
    when not ``safetensors``, as ``laion/clap-htsat-fused`` is published) and its ``ClapFeatureExtractor``
    (truncation ``fusion`` when ``fusion``, else ``rand_trunc``, as published). The computed-at-init
    weights (window-attention biases, BatchNorm statistics, LayerNorms) are randomised too, so that a
    loader that left one at its initial value would give other frames."""
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fields = {**TINY, **overrides}
    fields.setdefault("hidden_size", fields["patch_embeds_hidden_size"] * 2 ** (len(fields["depths"]) - 1))
    if fusion:
        fields = {"enable_fusion": True, "fusion_type": "aff_2d", **fields}
    torch.manual_seed(seed)
    model = ClapModel(ClapConfig(text_config=TINY_TEXT, audio_config=fields, projection_dim=8)).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in model.audio_model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("relative_position_bias_table"):
                tensor.copy_(0.5 * noise)
            elif name.endswith("running_mean"):
                tensor.copy_(10.0 + 5.0 * noise)
            elif name.endswith("running_var"):
                tensor.copy_(20.0 + 40.0 * torch.rand(tensor.shape, generator=generator))
            elif "norm" in name:  # LayerNorm weights and biases
                tensor.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
    model.save_pretrained(str(directory))
    if not safetensors:
        state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
        (directory / "model.safetensors").unlink()
        torch.save(state, directory / "pytorch_model.bin")
    ClapFeatureExtractor(truncation="fusion" if fusion else "rand_trunc", frequency_min=50,
                         padding="repeatpad").save_pretrained(str(directory))
    return directory
