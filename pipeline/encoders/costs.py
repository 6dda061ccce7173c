"""What embedding costs with each encoder at its real size: FLOPs per clip, GPU time, disk.

Counted from each published architecture (multiply-adds × 2), not measured: nothing here needs
the weights. A transformer block of width ``d`` and feed-forward width ``f`` over ``n`` tokens
costs ``2n(4d² + 2df) + 4n²d`` (projections, feed-forward, attention scores and mix; attention
within a window of ``w`` tokens: ``4nwd``). Convolutions cost ``2 × outputs × kernel × in × out``.

- Jukebox-5B cut after layer 36 (the paper's encoder): LLark's recipe, about 82 TFLOP per 25 s
  clip (two 8192-token windows through 36 of the prior's 72 blocks of width 4800).
- MERT-v1-95M / 330M: the 7-layer CNN on 24 kHz audio (75 Hz out), then 12 × 768 / 24 × 1024
  blocks over 5 s windows (375 frames).
- Whisper large-v3: two convolutions on 128 mel bins at 100 Hz, then 32 × 1280 blocks over 1500
  frames; every window is 30 s, so a 25 s clip pays for 30 s.
- CLAP HTSAT (Swin-T, depths 2-2-6-2, width 96 doubling per stage, 8 × 8 windows; the
  ``clap-htsat-*`` checkpoints, 768 wide) on a 256 × 256 image folded from 10 s of 64-bin mel
  spectrogram: a 25 s clip is three windows. The ``larger_clap`` checkpoints (2-2-12-2, 1024 wide)
  cost about twice as much.

GPU seconds = FLOP / (peak × utilisation). The default peak is an A100's dense bf16 312 TFLOPS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

A100_TFLOPS = 312.0
DEFAULT_UTILISATION = 0.4
JUKEBOX_TFLOP_PER_25S = 82.0


def block_flops(tokens: int, width: int, ff: int, window: int | None = None) -> float:
    attended = window or tokens
    return 2 * tokens * (4 * width**2 + 2 * width * ff) + 4 * tokens * attended * width


def conv_flops(outputs: float, kernel: int, channels_in: int, channels_out: int) -> float:
    return 2 * outputs * kernel * channels_in * channels_out


def mert_window_flops(width: int, layers: int, window_s: float = 5.0) -> tuple[float, int]:
    """FLOP of one MERT window and its frame count (conv strides 5, 2 × 6 on 24 kHz)."""
    rate, kernels, strides, channels = 24_000, [10, 3, 3, 3, 3, 2, 2], [5, 2, 2, 2, 2, 2, 2], 512
    samples, total, c_in = int(window_s * rate), 0.0, 1
    for kernel, stride in zip(kernels, strides):
        samples = (samples - kernel) // stride + 1
        total += conv_flops(samples, kernel, c_in, channels)
        c_in = channels
    total += 2 * samples * channels * width  # feature projection
    total += layers * block_flops(samples, width, 4 * width)
    return total, samples


def whisper_window_flops(width: int = 1280, layers: int = 32, mels: int = 128) -> float:
    total = conv_flops(3000, 3, mels, width) + conv_flops(1500, 3, width, width)
    return total + layers * block_flops(1500, width, 4 * width)


def htsat_window_flops(embed: int = 96, depths: tuple[int, ...] = (2, 2, 6, 2), grid: int = 64, window: int = 8) -> float:
    total = 2 * grid * grid * 16 * embed  # 4 × 4 patches of one channel
    for stage, depth in enumerate(depths):
        side, width = grid // 2**stage, embed * 2**stage
        total += depth * block_flops(side * side, width, 4 * width, window * window)
        if stage < len(depths) - 1:
            total += 2 * (side // 2) ** 2 * 4 * width * 2 * width  # patch merging
    return total


@dataclass(frozen=True)
class EncoderCost:
    name: str
    label: str
    window_s: float
    window_flop: float  # one window, however much of it is audio
    dim: int
    states: int  # hidden states kept by --layers all
    native_rate_hz: float

    def flop_per_clip(self, seconds: float = 25.0) -> float:
        return math.ceil(seconds / self.window_s - 1e-9) * self.window_flop

    def gpu_seconds(self, seconds: float = 25.0, tflops: float = A100_TFLOPS,
                    utilisation: float = DEFAULT_UTILISATION) -> float:
        return self.flop_per_clip(seconds) / (tflops * 1e12 * utilisation)


def encoder_costs() -> list[EncoderCost]:
    """The real-size encoders, cheapest last: Jukebox's figure is per 25 s (its windows are 23.8 s
    of tokens, a 25 s clip two of them)."""
    mert95, _ = mert_window_flops(768, 12)
    mert330, _ = mert_window_flops(1024, 24)
    return [
        EncoderCost("jukebox", "Jukebox-5B, layer 36", 12.5, JUKEBOX_TFLOP_PER_25S * 1e12 / 2, 4800, 1, 344.5),
        EncoderCost("whisper", "Whisper large-v3 encoder", 30.0, whisper_window_flops(), 1280, 33, 50.0),
        EncoderCost("mert", "MERT-v1-330M", 5.0, mert330, 1024, 25, 75.0),
        EncoderCost("mert", "MERT-v1-95M", 5.0, mert95, 768, 13, 75.0),
        EncoderCost("clap", "CLAP HTSAT (clap-htsat)", 10.0, htsat_window_flops(), 768, 1, 3.2),
    ]


def storage_per_clip(cost: EncoderCost, layers: str, seconds: float = 25.0, rate_hz: float = 10.0,
                     dtype_bytes: int = 2) -> int:
    """Bytes of one clip's array: ``layers`` 'one' (a state or a mean) or 'all'."""
    frames = math.ceil(seconds * min(rate_hz, cost.native_rate_hz) - 1e-9)
    return frames * cost.dim * (cost.states if layers == "all" else 1) * dtype_bytes


def cost_table(clips: int, seconds: float = 25.0, tflops: float = A100_TFLOPS,
               utilisation: float = DEFAULT_UTILISATION, only: str | None = None) -> list[str]:
    """The lines ``llark plan --encoder`` prints."""
    jukebox, *others = encoder_costs()
    rows = [jukebox] + [c for c in others if only in (None, "all", c.name)]
    lines = [f"embedding {clips:,} clips of {seconds:g} s at {tflops:g} TFLOPS peak x {utilisation:g} utilisation "
             "(computed from each architecture's FLOPs; disk at 10 Hz, float16):",
             f"  {'encoder':26s} {'TFLOP/clip':>10s} {'GPU-s/clip':>10s} {'GPU-hours':>10s} {'vs Jukebox':>10s} "
             f"{'disk: one layer':>16s} {'disk: all':>12s}"]
    for c in rows:
        seconds_gpu = c.gpu_seconds(seconds, tflops, utilisation)
        one = storage_per_clip(c, "one", seconds) * clips
        every = f"{storage_per_clip(c, 'all', seconds) * clips / 1e9:9.1f} GB" if c.states > 1 else f"{'-':>12s}"
        lines.append(f"  {c.label:26s} {c.flop_per_clip(seconds) / 1e12:10.3f} {seconds_gpu:10.4f} "
                     f"{seconds_gpu * clips / 3600:10,.2f} {jukebox.flop_per_clip(seconds) / c.flop_per_clip(seconds):9.0f}x "
                     f"{one / 1e9:13.1f} GB {every}")
    return lines
