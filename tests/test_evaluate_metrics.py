"""Every metric against hand-computed fixtures (tests/data/evaluate/<task>/) and, where mir_eval has
the metric, against mir_eval; every validate() on bad input; the intervals."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import mir_eval
import numpy as np
import pytest

from llark.evaluate import beats, genre, instruments, key, metre, parse, stats, tempo

DATA = Path(__file__).parent / "data" / "evaluate"


def fixture(task: str) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (DATA / task / "items.jsonl").read_text().splitlines() if line.strip()]
    return rows, json.loads((DATA / task / "expected.json").read_text())


# ---------------------------------------------------------------------------------------------
# key


def test_key_fixture():
    rows, expected = fixture("key")
    parsed = [parse.parse_key(r["answer"]) for r in rows]
    assert parsed == [r["parsed"] for r in rows]
    assert [key.weighted_score(r["reference"], p) for r, p in zip(rows, parsed)] == [r["score"] for r in rows]
    result = key.evaluate([r["reference"] for r in rows], parsed)
    assert result["mirex"].value == pytest.approx(expected["mirex"])
    assert result["accuracy"].value == pytest.approx(expected["accuracy"])
    assert result["fraction_unparseable"] * len(rows) == expected["unparseable"]
    descending = key.evaluate([r["reference"] for r in rows], parsed, allow_descending_fifths=True)
    assert descending["mirex"].value == pytest.approx(expected["mirex_descending_fifths"])


ALL_KEYS = [f"{t} {m}" for m in ("major", "minor")
            for t in ("C", "C#", "Db", "D", "D#", "Eb", "E", "F", "F#", "Gb", "G", "G#", "Ab", "A", "A#", "Bb", "B")]


def test_key_weighted_score_equals_mir_eval_on_every_pair():
    for ref, est in itertools.product(ALL_KEYS, ALL_KEYS):
        assert key.weighted_score(ref, est) == mir_eval.key.weighted_score(ref, est), (ref, est)


def test_key_relationships():
    assert key.relationship("A minor", "E minor") == "fifth"
    assert key.relationship("A minor", "D minor") == "other"
    assert key.relationship("A minor", "D minor", allow_descending_fifths=True) == "fifth"
    assert key.relationship("A minor", "C major") == "relative"
    assert key.relationship("C major", "A minor") == "relative"
    assert key.relationship("C major", "E minor") == "other"  # not relative: E minor shares G major's signature
    assert key.relationship("Db major", "C# minor") == "parallel"
    assert key.relationship("Db major", None) == "unparseable"


@pytest.mark.parametrize("bad", ["H major", "C dorian", "Cmajor", "C major minor", "", None])
def test_key_validate_rejects(bad):
    with pytest.raises(ValueError):
        key.validate(["C major"], [bad] if bad is not None else [42])


def test_key_validate_lengths():
    with pytest.raises(ValueError, match="2 reference keys but 1"):
        key.validate(["C major", "A minor"], ["C major"])


# ---------------------------------------------------------------------------------------------
# tempo


def test_tempo_fixture():
    rows, expected = fixture("tempo")
    parsed = [parse.parse_tempo(r["answer"]) for r in rows]
    assert parsed == [r["parsed"] for r in rows]
    assert [tempo.acc1(r["reference"], p) for r, p in zip(rows, parsed)] == [r["acc1"] for r in rows]
    assert [tempo.acc2(r["reference"], p) for r, p in zip(rows, parsed)] == [r["acc2"] for r in rows]
    result = tempo.evaluate([r["reference"] for r in rows], parsed)
    assert result["acc1"].value == pytest.approx(expected["acc1"])
    assert result["acc2"].value == pytest.approx(expected["acc2"])
    assert result["acc2"].method == "clopper-pearson"


def test_tempo_tolerance_edges():
    assert tempo.acc1(100.0, 104.0) and tempo.acc1(100.0, 96.0)
    assert not tempo.acc1(100.0, 104.01)
    assert tempo.acc2(100.0, 33.0) and tempo.acc2(100.0, 310.0)  # x1/3 and x3 within 4%
    assert not tempo.acc2(100.0, 150.0)  # x3/2 is not forgiven
    assert tempo.acc1(100.0, 110.0, tol=0.1)


@pytest.mark.parametrize("bad", [0.0, -120.0, float("nan"), float("inf"), "120", True])
def test_tempo_validate_rejects(bad):
    with pytest.raises(ValueError, match="positive, finite"):
        tempo.validate([bad], [120.0])


# ---------------------------------------------------------------------------------------------
# instruments


def test_instruments_fixture():
    rows, expected = fixture("instruments")
    vocabulary = instruments.VOCABULARIES[expected["vocabulary"]]
    found = [parse.parse_instruments(r["answer"], vocabulary) for r in rows]
    assert [sorted(f) if f is not None else None for f in found] == [r["parsed"] for r in rows]
    assert [instruments.counts(set(r["reference"]), f) for r, f in zip(rows, found)] == \
        [(r["tp"], r["fp"], r["fn"]) for r in rows]
    result = instruments.evaluate([set(r["reference"]) for r in rows], found, vocabulary)
    assert result["precision"] == pytest.approx(expected["precision"])
    assert result["recall"] == pytest.approx(expected["recall"])
    assert result["f1"].value == pytest.approx(expected["f1"])
    assert result["f1_per_item"] == pytest.approx(expected["f1_per_item"])
    assert result["f1"].low <= result["f1"].value <= result["f1"].high
    assert result["per_label"]["piano"] == {"precision": 2 / 3, "recall": 1.0, "support": 2}  # items 1, 3 and 6


def test_instruments_validate_rejects_unknown_label():
    with pytest.raises(ValueError, match="not in the vocabulary"):
        instruments.validate([{"kazoo"}], [set()], instruments.MUSICNET)


def test_general_midi_vocabulary_covers_medleydb_families():
    from pipeline.ingest.medleydb import GM_FAMILY

    families = {f for f in GM_FAMILY.values() if f is not None}
    assert families <= set(instruments.GENERAL_MIDI)


# ---------------------------------------------------------------------------------------------
# beats


def test_beats_fixture_and_mir_eval():
    rows, expected = fixture("beats")
    parsed = [parse.parse_times(r["answer"]) for r in rows]
    assert parsed == [r["parsed"] for r in rows]
    for r, p in zip(rows, parsed):
        score = beats.f_measure(np.array(r["reference"]), None if p is None else np.array(p))
        assert score == pytest.approx(r["f_measure"])
        if p is not None:
            assert score == pytest.approx(mir_eval.beat.f_measure(np.array(r["reference"]), np.array(p),
                                                                  f_measure_threshold=0.02))
    result = beats.evaluate([np.array(r["reference"]) for r in rows],
                            [None if p is None else np.array(p) for p in parsed])
    assert result["f_measure"].value == pytest.approx(expected["f_measure"])


def test_beats_window_is_20_ms_not_mir_eval_default():
    ref, est = np.array([1.0, 2.0]), np.array([1.05, 2.05])
    assert beats.f_measure(ref, est) == 0.0
    assert mir_eval.beat.f_measure(ref, est) == 1.0  # mir_eval's 70 ms default would pass both


def test_beats_validate_rejects_unsorted():
    with pytest.raises(ValueError, match="sorted"):
        beats.validate([np.array([2.0, 1.0])], [None])


# ---------------------------------------------------------------------------------------------
# genre


def test_genre_strict_fixture():
    rows, expected = fixture("genre")
    labels, texts = list(genre.GTZAN_LABELS), genre.GTZAN_LABEL_TEXTS
    strict = genre.strict_labels([r["answer"] for r in rows], labels, texts)
    assert strict == [r["strict"] for r in rows]
    result = genre.evaluate([r["reference"] for r in rows], strict, strict, labels)
    assert result["acc_strict"].value == pytest.approx(expected["acc_strict"])
    assert sum(s is None for s in strict) == expected["unparseable_strict"]


def bag_of_words(texts: list[str]) -> np.ndarray:
    """A stand-in embedding: counts of a small vocabulary, unit length."""
    vocabulary = ["rock", "metal", "jazz", "blues", "guitar", "distorted", "swing", "hip", "hop", "pop"]
    out = np.zeros((len(texts), len(vocabulary)))
    for i, t in enumerate(texts):
        words = parse.normalise_text(t).split()
        out[i] = [words.count(v) for v in vocabulary]
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1)


def test_genre_nearest_label_by_embedding():
    labels = ["rock", "metal", "jazz", "hiphop"]
    answers = ["Heavy metal with distorted guitar, metal all the way", "Swing jazz", "Some hip-hop", ""]
    got = genre.nearest_labels(answers, labels, bag_of_words, {"hiphop": "hip-hop"})
    assert got == ["metal", "jazz", "hiphop", None]


def test_genre_nearest_is_euclidean():
    labels = np.array([[0.0, 0.0], [10.0, 0.0]])
    assert genre.nearest(np.array([[4.9, 0.0], [5.1, 3.0]]), labels).tolist() == [0, 1]


def test_genre_validate_rejects_label_outside_vocabulary():
    with pytest.raises(ValueError, match="not in the vocabulary"):
        genre.validate(["rock"], ["polka"], ["rock", "pop"])


@pytest.mark.slow
def test_genre_sentence_embedder_offline():
    embed = genre.SentenceEmbedder()
    labels = list(genre.GTZAN_LABELS)
    answers = ["This is a heavy metal song with distorted guitars and screaming vocals.",
               "A classical piece played by a symphony orchestra.", "It is reggae, with an offbeat skank."]
    assert genre.nearest_labels(answers, labels, embed, genre.GTZAN_LABEL_TEXTS) == ["metal", "classical", "reggae"]
    vectors = embed(["rock"])
    assert vectors.shape == (1, 384) and np.linalg.norm(vectors) == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# metre


def test_metre_fixture():
    rows, expected = fixture("metre")
    parsed = [parse.parse_metre(r["answer"]) for r in rows]
    assert parsed == [r["parsed"] for r in rows]
    result = metre.evaluate([r["reference"] for r in rows], parsed)
    assert result["accuracy"].value == pytest.approx(expected["accuracy"])


def test_metre_validate_rejects():
    with pytest.raises(ValueError, match="positive integer"):
        metre.validate([0], [3])


# ---------------------------------------------------------------------------------------------
# intervals


@pytest.mark.parametrize("k, n, low, high", [
    (5, 10, 0.187086, 0.812914),
    (0, 10, 0.0, 0.308497),
    (10, 10, 0.691503, 1.0),
    (1, 1, 0.025, 1.0),
])
def test_clopper_pearson_known_values(k, n, low, high):
    got = stats.clopper_pearson(k, n)
    assert got == pytest.approx((low, high), abs=1e-6)


def test_clopper_pearson_is_the_beta_tail_inversion():
    from scipy.stats import binom

    low, high = stats.clopper_pearson(7, 20)
    # At the bounds, the binomial tails equal alpha / 2.
    assert binom.sf(6, 20, low) == pytest.approx(0.025, abs=1e-9)
    assert binom.cdf(7, 20, high) == pytest.approx(0.025, abs=1e-9)


@pytest.mark.parametrize("k, n", [(-1, 5), (6, 5), (0, 0), (1.5, 4)])
def test_clopper_pearson_rejects(k, n):
    with pytest.raises(ValueError):
        stats.clopper_pearson(k, n)


def test_bootstrap_mean_interval():
    scores = [1.0] * 30 + [0.0] * 70
    est = stats.mean(scores)
    assert est.value == pytest.approx(0.3)
    # The normal approximation of the percentile interval: 0.3 +- 1.96 * sqrt(0.21 / 100).
    assert est.low == pytest.approx(0.3 - 1.96 * 0.0458, abs=0.015)
    assert est.high == pytest.approx(0.3 + 1.96 * 0.0458, abs=0.015)
    assert stats.mean(scores) == est  # seeded: reproducible
    assert stats.mean([0.5] * 10).low == stats.mean([0.5] * 10).high == 0.5


def test_bootstrap_f1_interval_contains_value_and_is_seeded():
    rng = np.random.default_rng(1)
    tp, fp, fn = rng.integers(0, 4, 50), rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    a = stats.f1(tp, fp, fn, resamples=2000)
    assert a.low < a.value < a.high
    assert a.value == pytest.approx(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()))
    assert stats.f1(tp, fp, fn, resamples=2000) == a
    assert stats.f1(tp, fp, fn, resamples=2000, seed=2) != a


def test_accuracy_estimate():
    est = stats.accuracy([True, False, True, True])
    assert (est.value, est.n, est.method) == (0.75, 4, "clopper-pearson")
    assert (est.low, est.high) == pytest.approx(stats.clopper_pearson(3, 4))
    assert str(est).startswith("0.750 [")
