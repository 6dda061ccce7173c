"""The layer cut: the VQ-VAE's top-level encoder and codebook and the top prior's first ``layer``
blocks, built from jukebox-infer's modules; and the GPU memory it needs."""

from __future__ import annotations

from pipeline.encoders.jukebox.architecture import (
    ARTIST_UNKNOWN,
    DEFAULT_LAYER,
    GENRE_UNKNOWN,
    JUKEBOX_5B,
    JukeboxArchitecture,
)
from pipeline.runner import StageConfigError


def _jukebox_modules():
    try:
        from jukebox_infer.prior.autoregressive import ConditionalAutoregressive2D, roll
        from jukebox_infer.prior.conditioners import LabelConditioner
        from jukebox_infer.transformer.ops import Conv1D
        from jukebox_infer.vqvae.bottleneck import BottleneckBlock
        from jukebox_infer.vqvae.encdec import Encoder
    except ImportError as exc:
        raise StageConfigError(
            f"--encoder jukebox needs the jukebox-infer package ({exc}); install it with "
            "pip install 'jukebox-infer==0.1.2'"
        ) from None
    return ConditionalAutoregressive2D, roll, LabelConditioner, Conv1D, BottleneckBlock, Encoder


def _layer_cut_class():
    import torch

    ConditionalAutoregressive2D, roll, LabelConditioner, Conv1D, BottleneckBlock, Encoder = _jukebox_modules()

    class JukeboxLayerCut(torch.nn.Module):
        """The VQ-VAE's top-level encoder and codebook, and the top prior's first ``layer`` blocks."""

        def __init__(self, arch: JukeboxArchitecture, layer: int):
            super().__init__()
            self.arch, self.layer = arch, layer
            top = arch.vq_levels - 1
            multiplier = arch.vq_multipliers[top]
            self.vq_encoder = Encoder(
                1, arch.vq_emb_width, top + 1, arch.vq_downs_t[: top + 1], arch.vq_strides_t[: top + 1],
                width=arch.vq_width * multiplier, depth=arch.vq_depth * multiplier, m_conv=arch.vq_m_conv,
                dilation_growth_rate=arch.vq_dilation_growth_rate, dilation_cycle=arch.vq_dilation_cycle,
            )
            self.codebook = BottleneckBlock(arch.vq_bins, arch.vq_emb_width, 0.99)
            self.labels = LabelConditioner(
                y_bins=arch.y_bins, t_bins=arch.t_bins, sr=arch.sample_rate,
                min_duration=arch.min_duration_s, max_duration=arch.max_duration_s, n_time=arch.n_ctx,
                out_width=arch.width, init_scale=arch.init_scale,
                max_bow_genre_size=arch.max_bow_genre_size, include_time_signal=True,
            )
            self.prior = ConditionalAutoregressive2D(
                input_shape=(arch.n_ctx,), bins=arch.vq_bins, width=arch.width, depth=layer,
                heads=arch.heads, attn_order=arch.attn_order, blocks=arch.blocks, spread=None,
                init_scale=arch.init_scale, m_attn=arch.m_attn, m_mlp=arch.m_mlp,
                x_cond=True, y_cond=True, encoder_dims=0, merged_decoder=True, only_encode=True,
            )

        def to_inference(self, device, compute_dtype) -> "JukeboxLayerCut":
            """Move to ``device``: transformer matrices in ``compute_dtype``, everything else float32."""
            conv_weights = {id(m.w) for m in self.modules() if isinstance(m, Conv1D)}
            for module in self.modules():
                for name, param in list(module._parameters.items()):
                    if param is None:
                        continue
                    dtype = compute_dtype if id(param) in conv_weights else torch.float32
                    module._parameters[name] = torch.nn.Parameter(
                        param.detach().to(device=device, dtype=dtype), requires_grad=False
                    )
                for name, buf in list(module._buffers.items()):
                    if buf is not None:
                        module._buffers[name] = buf.to(device=device, dtype=torch.float32)
            return self.eval()

        def tokens(self, audio):
            """Top-level VQ-VAE codes of one clip: float32 audio ``[samples]`` → long ``[samples // hop]``."""
            # [1, samples, 1] permuted, as the VQ-VAE's own preprocess lays it out: a contiguous
            # [1, 1, samples] takes another convolution kernel, whose rounding can flip a near-tie code.
            encoded = self.vq_encoder(audio.view(1, -1, 1).permute(0, 2, 1).float())[-1]
            return self.codebook.encode(encoded)[0]

        def conditioning(self, offsets: list[int], total_lengths: list[int]):
            """Start vectors ``[B, 1, W]`` and timing signals ``[B, n_ctx, W]`` for windows at these
            token offsets (LabelConditioner.forward without its CUDA-only type assertion)."""
            arch, device = self.arch, self.prior.x_emb.weight.device
            genres = [GENRE_UNKNOWN] + [-1] * (arch.max_bow_genre_size - 1)
            y = torch.tensor(
                [[total, off * arch.hop_length, arch.n_ctx * arch.hop_length, ARTIST_UNKNOWN, *genres]
                 for off, total in zip(offsets, total_lengths)],
                dtype=torch.long, device=device,
            )
            total, start = y[:, 0:1].float(), y[:, 1:2].float()
            end = start + y[:, 2:3].float()
            genre = y[:, 4:]
            mask = (genre >= 0).float().unsqueeze(2)
            genre_emb = (self.labels.bow_genre_emb.emb(genre.clamp(0)) * mask).sum(dim=1, keepdim=True)
            start_emb = genre_emb + self.labels.artist_emb.emb(y[:, 3:4])
            timing = (
                self.labels.total_length_emb(total)
                + self.labels.absolute_pos_emb(start, end)
                + self.labels.relative_pos_emb(start / total, end / total)
            )
            return start_emb, timing

        def window_activations(self, tokens, offsets: list[int], total_lengths: list[int], compute_dtype):
            """Output of block ``layer`` for windows of tokens ``[B, L]`` (``L`` a multiple of the
            attention block size, at most ``n_ctx``; positions past a window's real tokens do not
            change the ones before them: the prior is causal)."""
            batch, length = tokens.shape
            start_emb, timing = self.conditioning(offsets, total_lengths)
            x = roll(self.prior.x_emb(tokens), 1)
            x[:, 0] = start_emb[:, 0]
            x = x + self.prior.pos_emb()[:length] + timing[:, :length]
            x = x.to(compute_dtype)
            for block in self.prior.transformer._attn_mods:
                x = block(x, encoder_kv=None, sample=False)
            return x

    return JukeboxLayerCut


def estimate_gpu_memory(arch: JukeboxArchitecture = JUKEBOX_5B, layer: int = DEFAULT_LAYER,
                        compute_bytes: int = 2, batch_windows: int = 1, clip_s: float = 25.0) -> dict[str, float]:
    """Bytes of GPU memory the layer cut needs: exact parameter bytes (counted on the meta device)
    and an upper estimate of the largest activations alive at once while one block runs."""
    import torch

    Conv1D = _jukebox_modules()[3]
    with torch.device("meta"):
        model = _layer_cut_class()(arch, layer)
    conv = {id(m.w) for m in model.modules() if isinstance(m, Conv1D)}
    transformer = sum(p.numel() * compute_bytes for p in model.parameters() if id(p) in conv)
    float32 = sum(p.numel() * 4 for p in model.parameters() if id(p) not in conv)
    float32 += sum(b.numel() * 4 for b in model.buffers())
    n, width = arch.n_ctx, arch.width
    state, mlp = int(arch.m_attn * width), int(arch.m_mlp * width)
    per_window = (
        n * width * 4 * 2             # the float32 embedding sum and timing signal before the cast
        + n * width * compute_bytes * 3  # residual stream, block input kept for the skip, attention output
        + n * width * 4               # a layer norm's float32 copy
        + n * state * 3 * compute_bytes * 2  # q, k, v and their contiguous reshapes
        + arch.heads * n * max(arch.block_ctx, arch.blocks) * (compute_bytes + 4)  # scores, float32 softmax
        + n * mlp * compute_bytes * 2  # MLP hidden and its activation
    )
    audio = int(clip_s * arch.sample_rate)
    vq_width = arch.vq_width * arch.vq_multipliers[-1]
    vq = audio // arch.vq_strides_t[0] * vq_width * 4 * 3 + (audio // arch.hop_length) * arch.vq_bins * 4
    return {
        "transformer_weights": transformer,
        "float32_weights": float32,
        "activations_per_window": per_window,
        "vq_encoder_activations": vq,
        "total": transformer + float32 + max(per_window * batch_windows, vq),
    }

