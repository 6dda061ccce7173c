"""The checkpoints: reading the release's files safely, selecting the tensors the layer cut needs,
and writing random-init checkpoints in the release's format."""

from __future__ import annotations

import math
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np

from pipeline.encoders.jukebox.architecture import (
    PRIOR_FILE,
    VQVAE_FILE,
    JukeboxArchitecture,
    JukeboxWeightsError,
)
from pipeline.encoders.jukebox.layer_cut import _layer_cut_class


def _numpy_safe_globals() -> list:
    """numpy scalars and dtypes, which Jukebox's saved hyperparameters hold (under numpy 1 names too)."""
    try:
        multiarray = np._core.multiarray
    except AttributeError:  # numpy < 2
        multiarray = np.core.multiarray
    entries: list = [np.dtype, np.ndarray, multiarray.scalar, multiarray._reconstruct]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        entries += [(multiarray.scalar, f"{module}.scalar"), (multiarray._reconstruct, f"{module}._reconstruct")]
    entries += [type(np.dtype(code)) for code in ("?", "b", "B", "h", "H", "i", "I", "l", "L", "q", "Q", "e", "f", "d")]
    return entries


def load_state_dict_file(path: Path) -> dict:
    """The ``model`` state dict of a release checkpoint, read without running any pickled code."""
    import torch

    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        reason = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise JukeboxWeightsError(
            f"{path}: refusing to unpickle it: it holds objects other than tensors and plain values ({reason})"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise JukeboxWeightsError(f"{path} is not a readable PyTorch checkpoint: {exc}") from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise JukeboxWeightsError(f"{path} holds no state dict (expected a 'model' entry of tensors)")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}


def select_layer_cut_weights(vq_state: dict, prior_state: dict, arch: JukeboxArchitecture, layer: int) -> dict:
    """The tensors the layer cut needs, under its own names; the rest is left behind."""
    top = arch.vq_levels - 1
    selected = {}
    for key, value in vq_state.items():
        if key.startswith(f"encoders.{top}."):
            selected["vq_encoder." + key[len(f"encoders.{top}."):]] = value
        elif key == f"bottleneck.level_blocks.{top}.k":
            selected["codebook.k"] = value
    depth = 0
    for key, value in prior_state.items():
        if key.startswith("y_emb."):
            selected["labels." + key[len("y_emb."):]] = value
        elif key.startswith(("prior.x_emb.", "prior.pos_emb.")):
            selected[key] = value
        elif key.startswith("prior.transformer._attn_mods."):
            index = int(key.split(".")[3])
            depth = max(depth, index + 1)
            if index < layer:
                selected[key] = value
    if depth < layer:
        raise JukeboxWeightsError(
            f"{PRIOR_FILE} holds {depth} transformer layers; layer {layer} needs at least that many"
        )
    return selected


def load_layer_cut(weights_dir: Path, arch: JukeboxArchitecture, layer: int, device: str, compute_dtype: str):
    """Build the layer cut on the meta device and fill it with the checkpoints' tensors."""
    import torch

    arch.check()
    JukeboxLayerCut = _layer_cut_class()
    vq_state = load_state_dict_file(Path(weights_dir) / VQVAE_FILE)
    prior_state = load_state_dict_file(Path(weights_dir) / PRIOR_FILE)
    selected = select_layer_cut_weights(vq_state, prior_state, arch, layer)
    del vq_state, prior_state  # drops every tensor that was not selected
    with torch.device("meta"):
        model = JukeboxLayerCut(arch, layer)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(selected))
    wrong = [f"{k} {tuple(selected[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in selected and selected[k].shape != v.shape]
    if missing or wrong:
        raise JukeboxWeightsError(
            f"the checkpoints in {weights_dir} do not match the Jukebox {arch.name} architecture: "
            + "; ".join(filter(None, [
                f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}" if missing else "",
                f"wrong shapes {', '.join(wrong[:5])}" if wrong else "",
            ]))
        )
    model.load_state_dict(selected, strict=True, assign=True)
    del selected
    return model.to_inference(torch.device(device), getattr(torch, compute_dtype))


def write_random_weights(weights_dir: str | os.PathLike, arch: JukeboxArchitecture, seed: int = 0) -> dict[str, Path]:
    """Write random-init checkpoints of ``arch`` in the release's format (for tests and benchmarks).

    The full VQ-VAE and the full ``arch.depth``-layer prior are built by jukebox-infer's own
    ``VQVAE`` and ``SimplePrior`` classes (what the release was saved from), the prior's
    transformer matrices in float16 as in the release, and saved as ``{"hps", "model", "step"}``
    in PyTorch's legacy (pre-zip) serialisation, with numpy scalars in ``hps`` as in the release.
    """
    import torch

    vqvae, prior = build_reference_models(arch, seed)
    out = Path(weights_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for filename, model in ((VQVAE_FILE, vqvae), (PRIOR_FILE, prior)):
        payload = {
            "hps": {"name": arch.name, "sr": arch.sample_rate, "n_ctx": np.int64(arch.n_ctx),
                    "downs_t": arch.vq_downs_t, "init_scale": float(arch.init_scale)},
            "model": {f"module.{k}" if filename == PRIOR_FILE else k: v for k, v in model.state_dict().items()},
            "step": 0,
        }
        torch.save(payload, out / filename, _use_new_zipfile_serialization=False)
        paths[filename] = out / filename
    return paths


def build_reference_models(arch: JukeboxArchitecture, seed: int = 0):
    """jukebox-infer's full ``VQVAE`` and top-level ``SimplePrior`` for ``arch``, random-init."""
    import contextlib
    import io

    import torch
    from jukebox_infer.prior.prior import SimplePrior
    from jukebox_infer.transformer.ops import _convert_conv_weights_to_fp16
    from jukebox_infer.vqvae.vqvae import VQVAE

    torch.manual_seed(seed)
    top = arch.vq_levels - 1
    hop = arch.hop_length
    vqvae = VQVAE(
        input_shape=(arch.n_ctx * hop, 1), levels=arch.vq_levels, downs_t=arch.vq_downs_t,
        strides_t=arch.vq_strides_t, emb_width=arch.vq_emb_width, l_bins=arch.vq_bins, mu=0.99,
        commit=0.02, spectral=0.0, multispectral=1.0, multipliers=arch.vq_multipliers,
        use_bottleneck=True, width=arch.vq_width, depth=arch.vq_depth, m_conv=arch.vq_m_conv,
        dilation_growth_rate=arch.vq_dilation_growth_rate, dilation_cycle=arch.vq_dilation_cycle,
        reverse_decoder_dilation=True,
    )
    with torch.no_grad():  # codebooks drawn from encoder outputs, as Jukebox initialises them
        noise = torch.randn(1, 1, max(arch.n_ctx, 2 * arch.vq_bins) * hop)
        for level, block in enumerate(vqvae.bottleneck.level_blocks):
            vectors = vqvae.encoders[level](noise)[-1][0].T
            picks = torch.randint(0, len(vectors), (arch.vq_bins,))
            block.k.copy_(vectors[picks] + 0.01 * vectors.std() * torch.randn_like(block.k))
    hops = [math.prod(s**d for s, d in zip(arch.vq_strides_t[: i + 1], arch.vq_downs_t[: i + 1]))
            for i in range(arch.vq_levels)]
    with contextlib.redirect_stdout(io.StringIO()):  # SimplePrior prints its shapes and id files
        prior = SimplePrior(
            z_shapes=[(arch.n_ctx * hop // h,) for h in hops], l_bins=arch.vq_bins,
            encoder=vqvae.encode, decoder=vqvae.decode, level=top,
            downs_t=arch.vq_downs_t, strides_t=arch.vq_strides_t, labels=True,
            prior_kwargs=dict(
                input_shape=(arch.n_ctx,), bins=arch.vq_bins, width=arch.width, depth=arch.depth,
                heads=arch.heads, attn_order=arch.attn_order, blocks=arch.blocks, spread=None,
                attn_dropout=0.0, resid_dropout=0.0, emb_dropout=0.0, zero_out=False,
                res_scale=arch.res_scale, pos_init=False, init_scale=arch.init_scale,
                m_attn=arch.m_attn, m_mlp=arch.m_mlp, checkpoint_res=0, checkpoint_attn=0, checkpoint_mlp=0,
            ),
            x_cond_kwargs=dict(out_width=arch.width, init_scale=arch.init_scale, width=arch.width,
                               depth=1, m_conv=1.0, dilation_growth_rate=1, dilation_cycle=None,
                               zero_out=False, res_scale=False, checkpoint_res=0),
            y_cond_kwargs=dict(out_width=arch.width, init_scale=arch.init_scale, y_bins=arch.y_bins,
                               t_bins=arch.t_bins, sr=arch.sample_rate, min_duration=arch.min_duration_s,
                               max_duration=arch.max_duration_s, max_bow_genre_size=arch.max_bow_genre_size),
            prime_kwargs=dict(use_tokens=False, prime_loss_fraction=0.0, n_tokens=0, bins=80),
            copy_input=False, labels_v3=False, merged_decoder=True, single_enc_dec=False,
        )
    if arch.fp16_params:
        prior.apply(_convert_conv_weights_to_fp16)
    return vqvae.eval(), prior.eval()
