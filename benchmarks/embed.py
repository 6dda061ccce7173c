"""Encoder costs: the features encoder on one core, the tiny random Jukebox on CPU, and the GPU
memory the real 36-layer Jukebox cut needs.

    .venv/bin/python benchmarks/embed.py               # 20 clips of 25 s
    .venv/bin/python benchmarks/embed.py --clips 50 --skip-librosa

Prints:

- features encoder: 25 s clips per second on one core (one BLAS/FFT thread, as each runner worker
  has), and, when librosa is installed, the same representation computed with librosa for
  comparison (its import and first-call JIT cost included), which is why the encoder uses
  numpy/scipy only;
- jukebox on CPU: load time and cost per 25 s clip of the tiny random-init model of the same
  architecture (the code path the real weights take, at a size that runs here), and its clips/s
  when clips are encoded one at a time and in batches of 4 (``llark embed --batch-size``; the
  batch's windows share forward passes), with a check that both give the same arrays;
- jukebox on GPU: parameters and an estimate of the activations of the real cut (Jukebox-5B, 36
  layers, width 4800, 8192-token windows) for 25 s clips, and the multiply-adds per clip, so a
  user can size workers (one worker per GPU) and --batch-windows;
- mert, whisper and clap on CPU: clips/s of each tiny random stand-in (``pipeline.encoders.standins``)
  at --batch-size 1 and 4, with the largest difference between the two runs' arrays;
- every encoder at its real size: TFLOP and A100 GPU-seconds per 25 s clip at 40% utilisation
  and GPU-hours and disk for 164,000 clips (about the paper's; ``llark plan --encoder all``), and the storage of one clip at 10 Hz in float16 with
  ``--layers 6``, ``6-12`` and ``all``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one core, as each runner worker gets

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SR = 44_100
GB = 1e9


def synthetic_clip(seconds: float, seed: int) -> np.ndarray:
    """Chords, a bass line and drums at a random tempo: enough structure for every column to work."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    bpm = rng.uniform(70, 160)
    beat = 60.0 / bpm
    x = np.zeros_like(t)
    for k, root in enumerate(rng.choice([0, 5, 7, 9], size=int(seconds / (4 * beat)) + 1)):
        span = (t >= k * 4 * beat) & (t < (k + 1) * 4 * beat)
        for interval in (0, 4, 7):
            x[span] += 0.15 * np.sin(2 * np.pi * 261.63 * 2 ** ((root + interval) / 12) * t[span])
        x[span] += 0.2 * np.sin(2 * np.pi * 65.41 * 2 ** (root / 12) * t[span])
    for onset in np.arange(0, seconds, beat):
        i = int(onset * SR)
        n = min(3000, len(x) - i)
        x[i : i + n] += 0.5 * rng.standard_normal(n) * np.exp(-np.arange(n) / 400)
    return (x / np.abs(x).max()).astype(np.float32)


def bench_features(clips: list[np.ndarray], skip_librosa: bool) -> None:
    from pipeline.encoders.features import FeaturesEncoder

    encoder = FeaturesEncoder()
    encoder.encode(clips[0], SR)
    start = time.perf_counter()
    for clip in clips:
        encoder.encode(clip, SR)
    seconds = time.perf_counter() - start
    print(f"features encoder (numpy/scipy), one core: {len(clips) / seconds:.2f} clips/s "
          f"({1000 * seconds / len(clips):.0f} ms per 25 s clip)")
    if skip_librosa:
        return
    try:
        start = time.perf_counter()
        import librosa
    except ImportError:
        print("  librosa not installed: no comparison")
        return

    def with_librosa(y):
        mel = librosa.feature.melspectrogram(y=y, sr=SR, n_fft=2048, hop_length=441, n_mels=64)
        chroma = librosa.feature.chroma_stft(y=y, sr=SR, n_fft=8192, hop_length=2205)
        onset = librosa.onset.onset_strength(y=y, sr=SR, hop_length=441)
        tempogram = librosa.feature.tempogram(onset_envelope=onset, sr=SR, hop_length=441, win_length=800)
        return mel, chroma, tempogram

    with_librosa(clips[0])
    first = time.perf_counter() - start
    start = time.perf_counter()
    for clip in clips:
        with_librosa(clip)
    seconds = time.perf_counter() - start
    print(f"  the same with librosa {librosa.__version__}: {len(clips) / seconds:.2f} clips/s, "
          f"plus {first:.1f} s to import it and JIT-compile on first use (per worker process)")


def bench_jukebox_cpu(clips: list[np.ndarray], batch_clips: int) -> None:
    import torch

    from pipeline.encoders import jukebox as jb

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as weights:
        jb.write_random_weights(weights, jb.JUKEBOX_TINY)
        start = time.perf_counter()
        encoder = jb.build(jb.check_options({"weights_dir": weights, "architecture": "tiny", "layer": 3}))
        load = time.perf_counter() - start
        encoder.encode(clips[0], SR)
        start = time.perf_counter()
        for clip in clips[:5]:
            out = encoder.encode(clip, SR)
        seconds = (time.perf_counter() - start) / min(5, len(clips))
        arch = jb.JUKEBOX_TINY
        print(f"jukebox, tiny random model (width {arch.width}, {arch.depth} layers cut at 3, {arch.n_ctx}-token "
              f"windows), CPU, one thread: load {load:.1f} s, {seconds:.2f} s per 25 s clip -> {out.shape}")

        # A 25 s clip is 68 of the tiny model's 128-token windows but 2 of the real model's; clips of
        # 0.6 s are 2 tiny windows, so batching them is what batching 25 s clips is for the real model.
        long_clips = clips[:batch_clips]
        short_clips = [clip[: int(0.6 * SR)] for clip in long_clips] * 4
        for label, chosen in (("25 s", long_clips), ("0.6 s (2 windows, as 25 s for Jukebox-5B)", short_clips)):
            batch_set = [(clip, SR) for clip in chosen]
            results = {}
            for batch in (1, 4):
                encoder.batch_windows = 2 * batch  # as llark embed sets it for --batch-size
                start = time.perf_counter()
                arrays = [a for i in range(0, len(batch_set), batch)
                          for a in encoder.encode_batch(batch_set[i : i + batch])]
                results[batch] = (len(batch_set) / (time.perf_counter() - start), arrays)
            same = all(np.array_equal(a, b) for a, b in zip(results[1][1], results[4][1]))
            print(f"  {len(batch_set)} clips of {label}: --batch-size 1: {results[1][0]:.2f} clips/s; "
                  f"--batch-size 4: {results[4][0]:.2f} clips/s ({results[4][0] / results[1][0]:.2f}x); "
                  f"arrays {'identical' if same else 'DIFFERENT'}")


def bench_jukebox_gpu_estimate() -> None:
    from pipeline.encoders import jukebox as jb

    arch, layer = jb.JUKEBOX_5B, jb.DEFAULT_LAYER
    print(f"jukebox-5b cut after layer {layer} on a GPU (estimate; float16 or bfloat16 transformer):")
    for batch in (1, 2, 4, 8, 16):
        e = jb.estimate_gpu_memory(arch, layer, compute_bytes=2, batch_windows=batch)
        print(f"  --batch-windows {batch}: weights {e['transformer_weights'] / GB:.2f} GB (16-bit transformer) + "
              f"{e['float32_weights'] / GB:.2f} GB (float32 embeddings, norms, VQ-VAE encoder) + activations "
              f"{batch} x {e['activations_per_window'] / GB:.2f} GB = {e['total'] / GB:.1f} GB, plus the CUDA "
              "context (about 0.5 GB) and allocator slack")
    e = jb.estimate_gpu_memory(arch, layer, compute_bytes=4)
    print(f"  --compute-dtype float32: {e['total'] / GB:.1f} GB")
    per_layer = 4800 * 3600 + 1200 * 4800 + 2 * 4800 * 4800
    windows = len(jb.plan_windows(25 * SR // arch.hop_length, arch.n_ctx))
    macs = windows * arch.n_ctx * layer * per_layer
    print(f"  a 25 s clip is {windows} windows of {arch.n_ctx} tokens: {2 * macs / 1e12:.0f} TFLOP in the "
          "transformer's matrix products (attention scores add under 1%); --context truncate halves it")


def bench_pretrained_cpu(clips: list[np.ndarray], batch_clips: int) -> None:
    import torch

    from pipeline.encoders import build_encoder, check_encoder_options
    from pipeline.encoders.standins import ENCODERS, write_standin

    torch.set_num_threads(1)
    print(f"mert, whisper, clap: tiny random stand-ins on CPU, one thread ({torch.get_num_threads()}), "
          f"{batch_clips} clips of 25 s:")
    with tempfile.TemporaryDirectory() as root:
        for name in ENCODERS:
            directory = write_standin(name, Path(root) / name)
            results = {}
            for batch in (1, 4):
                options = check_encoder_options(name, {"weights_dir": str(directory), "batch_windows": 8 * batch})
                encoder = build_encoder(name, options)
                encoder.encode(clips[0][: SR], SR)  # warm-up
                chosen = [(clip, SR) for clip in clips[:batch_clips]]
                start = time.perf_counter()
                arrays = [a for i in range(0, len(chosen), batch) for a in encoder.encode_batch(chosen[i : i + batch])]
                results[batch] = (len(chosen) / (time.perf_counter() - start), arrays)
            gap = max(float(np.abs(a - b).max()) for a, b in zip(results[1][1], results[4][1]))
            print(f"  {name:8s} -> {results[1][1][0].shape}: --batch-size 1: {results[1][0]:.2f} clips/s; "
                  f"--batch-size 4: {results[4][0]:.2f} clips/s ({results[4][0] / results[1][0]:.2f}x); "
                  f"largest difference between the two: {gap:.1e}")


def bench_real_size_costs() -> None:
    from pipeline.encoders.costs import cost_table, encoder_costs, storage_per_clip

    for line in cost_table(164_000, 25.0):  # about the paper's training clips
        print(line)
    print("storage of one 25 s clip at 10 Hz (clap: 3.2 Hz), float16:")
    for cost in encoder_costs()[1:]:
        every = f"{storage_per_clip(cost, 'all') / 1e6:6.2f} MB" if cost.states > 1 else "     -   "
        print(f"  {cost.label:26s} --layers 6 or 6-12: {storage_per_clip(cost, 'one') / 1e6:5.2f} MB; "
              f"--layers all ({cost.states} states): {every}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=20, help="25 s clips for the features encoder")
    parser.add_argument("--skip-librosa", action="store_true")
    parser.add_argument("--batch-clips", type=int, default=8, help="25 s clips for the jukebox batch 1 vs 4 timing")
    args = parser.parse_args()
    clips = [synthetic_clip(25.0, seed) for seed in range(max(args.clips, args.batch_clips))]
    bench_features(clips[: args.clips], args.skip_librosa)
    bench_jukebox_cpu(clips, args.batch_clips)
    bench_jukebox_gpu_estimate()
    bench_pretrained_cpu(clips, min(args.batch_clips, 8))
    bench_real_size_costs()


if __name__ == "__main__":
    main()
