"""The ``mert`` encoder: MERT-v1 (95M: 12 layers × 768; 330M: 24 layers × 1024), 24 kHz in, 75 Hz out.

MERT's published checkpoints (``m-a-p/MERT-v1-95M``, ``m-a-p/MERT-v1-330M``) ship their own
modeling code, built from transformers' HuBERT modules. This loader needs no ``trust_remote_code``:
it reads the checkpoint's ``config.json`` (``model_type: mert_model``), maps it onto a
``HubertConfig`` and loads the weights into transformers' ``HubertModel``, whose module names the
checkpoint already uses (the position convolution's old ``weight_g``/``weight_v`` weight-norm
names are mapped to today's). What MERT adds and HuBERT lacks is refused, naming the field:
the CQT branch (``feature_extractor_cqt``) and DeepNorm residuals (``deepnorm``). Its
``attention_relax`` is only read by the DeepNorm encoder, and ``do_stable_layer_norm`` (330M) and
the group or layer feature norm are HuBERT's own options.

Input: each window is normalised to zero mean and unit variance (the checkpoint's
``Wav2Vec2FeatureExtractor`` with ``do_normalize``, as its model card does). Windows are 5 s
(``--window-seconds``; MERT was pre-trained on 5 s excerpts), giving 374 frames each (a
400-sample receptive field every 320 samples); frame ``j`` of a window starts at ``j / 75`` s.
``--layers``: hidden states 0 (the CNN features after the position convolution) to 12 or 24;
default ``mean`` of all of them (MusiLingo's choice; MU-LLaMA learns a mix of all 25, ``--layers
all`` keeps them for that).
"""

from __future__ import annotations

import json
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
    parse_frame_rate,
    parse_layers,
    read_json_file,
)
from pipeline.files import write_json
from pipeline.runner import StageConfigError

NAME = "mert"
SAMPLE_RATE = 24_000
WHAT = "MERT-v1 (m-a-p/MERT-v1-95M or m-a-p/MERT-v1-330M)"
DEFAULT_OPTIONS = {**COMMON_OPTIONS, "layers": "mean", "window_seconds": 5.0}
# MERT fields that select code HuBERT does not have, and the value under which they are inert.
UNSUPPORTED = {"feature_extractor_cqt": False, "deepnorm": False}
HUBERT_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act", "layer_norm_eps",
    "feat_extract_norm", "feat_extract_activation", "conv_dim", "conv_stride", "conv_kernel", "conv_bias",
    "num_conv_pos_embeddings", "num_conv_pos_embedding_groups", "conv_pos_batch_norm", "do_stable_layer_norm",
    "feat_proj_layer_norm",
)


def hubert_config(raw: dict[str, Any]):
    """The ``HubertConfig`` equivalent of a MERT ``config.json``; refuses what HuBERT cannot run."""
    from transformers import HubertConfig

    if raw.get("model_type") not in ("mert_model", "hubert"):
        raise StageConfigError(f"--weights-dir: config.json has model_type {raw.get('model_type')!r}, not a MERT "
                               "checkpoint (mert_model)")
    for field, inert in UNSUPPORTED.items():
        if raw.get(field, inert) != inert:
            raise StageConfigError(f"--weights-dir: config.json sets {field}: {json.dumps(raw[field])}; this loader builds "
                                   f"MERT from transformers' HuBERT modules and does not implement {field}")
    kept = {k: raw[k] for k in HUBERT_FIELDS if k in raw}
    # Inference: no dropout, no masking, so no masked_spec_embed is needed.
    return HubertConfig(**kept, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                        feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, mask_feature_prob=0.0)


def rename_key(key: str) -> str | None:
    """A MERT checkpoint key → ``HubertModel``'s; None for what inference does not use."""
    for prefix in ("mert_model.", "hubert."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key == "masked_spec_embed" or key.startswith(("label_embs", "final_proj", "cqt")):
        return None
    return (key.replace("pos_conv_embed.conv.weight_g", "pos_conv_embed.conv.parametrizations.weight.original0")
               .replace("pos_conv_embed.conv.weight_v", "pos_conv_embed.conv.parametrizations.weight.original1"))


def frames_of(n_samples: int, kernels: list[int], strides: list[int]) -> int:
    """Frames the convolutional feature encoder gives for ``n_samples``."""
    for kernel, stride in zip(kernels, strides):
        n_samples = (n_samples - kernel) // stride + 1
    return n_samples


def receptive_field(kernels: list[int], strides: list[int]) -> int:
    """Samples one frame sees (400 for MERT): the shortest input that gives a frame."""
    field, jump = 1, 1
    for kernel, stride in zip(kernels, strides):
        field, jump = field + (kernel - 1) * jump, jump * stride
    return field


def check_options(options: dict[str, Any], devices_here: bool = True) -> dict[str, Any]:
    opts = pretrained.check_common_options(NAME, options, DEFAULT_OPTIONS, devices_here)
    directory = check_checkpoint_dir(NAME, WHAT, opts["weights_dir"])
    raw = read_json_file(directory / "config.json")
    config = hubert_config(raw)
    rate = int(raw.get("sample_rate", SAMPLE_RATE))
    window = float(opts["window_seconds"])
    if not 1.0 <= window <= 60.0:
        raise StageConfigError(f"--window-seconds must be between 1 and 60, got {window:g}")
    states = config.num_hidden_layers + 1
    layers = parse_layers(opts["layers"], states)
    native = rate / math.prod(config.conv_stride)
    frame_rate = parse_frame_rate(opts["frame_rate"], native)
    return {**opts, "weights_dir": str(directory), "layers": layers.manifest_value,
            "frame_rate": "native" if frame_rate is None else frame_rate, "window_seconds": window}


def describe(options: dict[str, Any]) -> dict[str, Any]:
    directory = Path(options["weights_dir"])
    raw = read_json_file(directory / "config.json")
    config = hubert_config(raw)
    rate = int(raw.get("sample_rate", SAMPLE_RATE))
    native = rate / math.prod(config.conv_stride)
    frame_rate = None if options["frame_rate"] == "native" else float(options["frame_rate"])
    return {
        "name": NAME,
        "layer": parse_layers(options["layers"], config.num_hidden_layers + 1).manifest_value,
        "frame_rate_hz": frame_rate or native,
        "dim": config.hidden_size,
        "config": {
            "model": f"mert-v1 {config.num_hidden_layers} layers x {config.hidden_size}",
            "checkpoint": pretrained.checkpoint_identity(directory),
            "sample_rate": rate,
            "hidden_states": config.num_hidden_layers + 1,
            "window_s": options["window_seconds"],
            "native_frame_rate_hz": native,
            "pooling": "mean of the frames that start in each output frame" if frame_rate else "none",
            "input": "mono, resampled with soxr HQ, each window normalised to zero mean and unit variance",
        },
        "packages": pretrained.PACKAGES,
    }


def load_model(directory: Path, device: str, compute_dtype: str):
    """``HubertModel`` with the checkpoint's weights, in eval mode on ``device``."""
    from transformers import HubertModel

    config = hubert_config(read_json_file(directory / "config.json"))
    return pretrained.load_module(HubertModel, config, directory, rename_key, device, compute_dtype,
                                  optional=("masked_spec_embed",))


def normalise(windows: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per window, as ``Wav2Vec2FeatureExtractor(do_normalize=True)``."""
    from transformers import Wav2Vec2FeatureExtractor

    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, do_normalize=True)
    return np.stack(extractor([w for w in windows], sampling_rate=SAMPLE_RATE)["input_values"]).astype(np.float32)


def build(options: dict[str, Any]) -> PretrainedEncoder:
    import torch

    directory, description, device, model = pretrained.load_for_build(options, describe, load_model)
    config = model.config
    rate = description["config"]["sample_rate"]
    dtype = pretrained.torch_dtype(options["compute_dtype"])

    def hidden_states(windows: np.ndarray, first: int, last: int, frames: int) -> np.ndarray:
        x = torch.from_numpy(normalise(windows)).to(device=device, dtype=dtype)
        with torch.inference_mode():
            return pretrained.stacked_states(model(x, output_hidden_states=True).hidden_states, first, last, frames)

    shortest = receptive_field(config.conv_kernel, config.conv_stride)
    window_model = WindowModel(
        sample_rate=rate, window_samples=int(round(options["window_seconds"] * rate)),
        frame_period_s=math.prod(config.conv_stride) / rate, hidden_states=hidden_states,
        valid_frames=lambda n: frames_of(max(n, shortest), config.conv_kernel, config.conv_stride),
        min_samples=shortest,
    )
    return pretrained.make_encoder(options, description, window_model)


# ---------------------------------------------------------------------------------------------
# A tiny random stand-in in the published layout (tests and `make demo ENCODER=mert`)

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "conv_dim": [16, 16, 16, 16, 16, 16, 16], "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4}


def write_random_checkpoint(directory: Path, seed: int = 0, safetensors: bool = False, **overrides) -> Path:
    """A random MERT-layout checkpoint: config.json (``mert_model``, MERT's fields), preprocessor_config.json
    and ``pytorch_model.bin`` with the release's key names (or ``model.safetensors``)."""
    import torch
    from transformers import HubertConfig, HubertModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fields = {**TINY, **overrides}
    torch.manual_seed(seed)
    model = HubertModel(HubertConfig(**fields)).eval()
    state = {}
    for key, value in model.state_dict().items():
        key = key.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                                   "weight_v")
        state[key] = value.contiguous().clone()
    config = {
        "architectures": ["MERTModel"], "model_type": "mert_model",
        "auto_map": {"AutoConfig": "configuration_MERT.MERTConfig", "AutoModel": "modeling_MERT.MERTModel"},
        "sample_rate": SAMPLE_RATE, "feature_rate": 75, "feature_extractor_cqt": False,
        "feature_extractor_cqt_bins": 336, "deepnorm": False, "attention_relax": -1.0,
        "feat_extract_norm": "group", "do_stable_layer_norm": False, "conv_bias": False,
        "conv_kernel": [10, 3, 3, 3, 3, 2, 2], "conv_stride": [5, 2, 2, 2, 2, 2, 2], "mask_time_prob": 0.05,
        "feat_proj_layer_norm": True, "layer_norm_eps": 1e-5, "hidden_act": "gelu", **fields,
    }
    if "masked_spec_embed" not in state:
        state["masked_spec_embed"] = torch.rand(fields["hidden_size"])
    write_json(directory / "config.json", config, sort_keys=True)
    write_json(directory / "preprocessor_config.json", {
        "do_normalize": True, "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
        "padding_side": "right", "padding_value": 0, "return_attention_mask": True, "sampling_rate": SAMPLE_RATE}, sort_keys=True)
    if safetensors:
        from safetensors.torch import save_file

        save_file(state, str(directory / "model.safetensors"))
    else:
        torch.save(state, directory / "pytorch_model.bin")
    return directory

