"""Captioning metrics through the COCO caption toolkit (pycocoevalcap; its tokenizer and METEOR run
on Java, so the scoring test is slow), and the plain message when Java is missing."""

from __future__ import annotations

import pytest

from llark.evaluate import captions

REFERENCES = [
    ["A slow piano ballad with soft strings and a gentle melody."],
    ["A fast rock song with loud drums, distorted guitar and shouted vocals."],
    ["An electronic dance track with a four on the floor kick and a synth pad."],
]


@pytest.mark.slow
def test_identical_and_unrelated_captions():
    same = captions.evaluate(REFERENCES, [r[0] for r in REFERENCES])
    assert same["bleu_1"] == pytest.approx(1.0) and same["bleu_4"] == pytest.approx(1.0)
    assert same["rouge_l"] == pytest.approx(1.0)
    assert same["meteor"] > 0.9
    assert same["cider"] > 5.0  # CIDEr-D of an exact match, x10 scale, three distinct references
    unrelated = captions.evaluate(REFERENCES, ["Birds sing in a quiet forest at dawn.", None, "Rain on a roof."])
    assert unrelated["bleu_4"] < 1e-6 and unrelated["rouge_l"] < 0.2 and unrelated["cider"] < 0.2
    assert unrelated["per_item"]["meteor"][1] == 0.0  # the empty answer
    assert len(unrelated["per_item"]["rouge_l"]) == 3


def test_missing_java_is_reported_plainly(monkeypatch):
    monkeypatch.setattr(captions.shutil, "which", lambda name: None)
    with pytest.raises(captions.MetricUnavailable, match="Java runtime"):
        captions.evaluate(REFERENCES, ["a caption", "another", "a third"])


def test_validate():
    with pytest.raises(ValueError, match="non-empty list"):
        captions.validate(["a caption, not a list"], ["x"])
    with pytest.raises(ValueError, match="2 reference lists but 1"):
        captions.validate([["a"], ["b"]], ["x"])
