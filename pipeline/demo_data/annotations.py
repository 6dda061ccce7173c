"""The ground truth of a clip, derived from its plan: the metadata row and the annotation document
(beats, chords and, for long tracks, sections)."""

from __future__ import annotations

from pipeline.demo_data.plan import ClipPlan
from pipeline.demo_data.theory import chord_label, key_name, pitch_names


def beat_annotations(plan: ClipPlan) -> list[dict]:
    n = plan.style.beats_per_bar
    beats = []
    k = 0
    while (t := plan.lead_in_s + k * plan.beat_s) < plan.duration_s - 1e-9:
        beats.append({"time": round(t, 6), "beat_number": k % n + 1})
        k += 1
    return beats


def chord_annotations(plan: ClipPlan) -> list[dict]:
    chords = []
    if plan.lead_in_s > 0:
        chords.append({"start": 0.0, "end": round(plan.lead_in_s, 6), "chord": "N"})
    for b, numeral in enumerate(plan.bars):
        start = plan.bar_start(b)
        end = min(plan.bar_start(b + 1), plan.duration_s)
        if start >= plan.duration_s:
            break
        chords.append({"start": round(start, 6), "end": round(end, 6),
                       "chord": chord_label(plan.tonic, plan.mode, numeral)})
    return chords


def section_annotations(plan: ClipPlan) -> list[dict]:
    out = []
    for b, name in enumerate(plan.sections):
        start = plan.bar_start(b) if b else 0.0
        if out and out[-1]["section"] == name:
            out[-1]["end"] = round(min(plan.bar_start(b + 1), plan.duration_s), 6)
        else:
            out.append({"start": round(start, 6),
                        "end": round(min(plan.bar_start(b + 1), plan.duration_s), 6),
                        "section": name})
    return out


def metadata_row(plan: ClipPlan) -> dict:
    return {
        "id": plan.id,
        "split": plan.split,
        "genre": plan.style.name,
        "tempo_bpm": plan.tempo_bpm,
        "key": key_name(plan.tonic, plan.mode),
        "tonic": pitch_names(plan.tonic, plan.mode)[plan.tonic],
        "mode": plan.mode,
        "metre": f"{plan.style.beats_per_bar}/4",
        "beats_per_bar": plan.style.beats_per_bar,
        "instruments": ";".join(sorted(set(plan.instruments.values()))),
        "progression": "-".join(plan.loop),
        "duration_s": plan.duration_s,
        "audio": plan.audio_relpath,
    }


def annotation_document(plan: ClipPlan) -> dict:
    doc = metadata_row(plan)
    doc["instruments"] = sorted(set(plan.instruments.values()))
    doc.update(
        synthetic=True,
        sample_rate=plan.sample_rate,
        lead_in_s=plan.lead_in_s,
        parts=dict(sorted(plan.instruments.items())),
        bar_chords=list(plan.bars),
        beats=beat_annotations(plan),
        chords=chord_annotations(plan),
    )
    if any(s != "main" for s in plan.sections):
        doc["sections"] = section_annotations(plan)
    return doc
