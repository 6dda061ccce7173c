"""Instrument identification: precision, recall and F1 over a closed vocabulary.

Conventions
-----------
References and estimates are sets of labels of one vocabulary per dataset:

- MusicNet: the eleven instruments its labels name (piano, harpsichord, violin, viola, cello,
  contrabass, french horn, oboe, bassoon, clarinet, flute);
- MedleyDB: General MIDI instrument families, drums and vocals each one instrument, as the LLark
  paper maps them (appendix D.1.4; :mod:`pipeline.ingest.medleydb`);
- the demo data: its nine instruments.

Each label has synonyms (``VOCABULARIES``): an answer is read with
:func:`llark.evaluate.parse.parse_instruments`; an answer naming no instrument is the empty set,
an empty answer is unparseable (and scored as the empty set).

Metrics
-------
Per item, true positives ``|ref ∩ est|``, false positives ``|est - ref|`` and false negatives
``|ref - est|``. **precision**, **recall** and **f1** are micro-averaged: counts summed over the
items, then ``P = TP / (TP + FP)``, ``R = TP / (TP + FN)``, ``F1 = 2TP / (2TP + FP + FN)``. F1 gets
a 95% bootstrap interval over items (as in LLark Table 2). ``f1_per_item`` is the mean of the
items' own F1 (an item with nothing to find and nothing found scores 1). ``per_label`` gives each
label's precision, recall and support.
"""

from __future__ import annotations

import logging
from typing import AbstractSet, Mapping, Sequence

import numpy as np

from llark.evaluate import stats
from llark.evaluate.parse import parse_instruments
from llark.evaluate.tasks import EvalConfigError, Task, columns, label, register

log = logging.getLogger("llark")

MUSICNET = {
    "piano": ["pianoforte", "grand piano"],
    "harpsichord": ["cembalo"],
    "violin": ["fiddle"],
    "viola": [],
    "cello": ["violoncello"],
    "contrabass": ["double bass", "string bass", "upright bass", "bass"],
    "french horn": ["horn"],
    "oboe": [],
    "bassoon": [],
    "clarinet": ["bass clarinet"],
    "flute": ["piccolo"],
}

# General MIDI families (MedleyDB as LLark maps it); synonyms are the instruments in each family.
GENERAL_MIDI = {
    "piano": ["grand piano", "electric piano", "keyboard", "keys", "harpsichord", "clavinet", "rhodes"],
    "chromatic percussion": ["xylophone", "vibraphone", "marimba", "glockenspiel", "celesta", "tubular bells",
                             "chimes", "dulcimer", "music box"],
    "organ": ["hammond organ", "pipe organ", "electronic organ", "accordion", "harmonica", "concertina",
              "bandoneon", "harmonium", "melodica"],
    "guitar": ["acoustic guitar", "electric guitar", "clean electric guitar", "distorted electric guitar",
               "slide guitar", "lap steel guitar", "steel guitar", "mandolin", "ukulele"],
    "bass": ["bass guitar", "electric bass", "double bass", "upright bass", "contrabass", "synth bass",
             "bass line", "bassline"],
    "strings": ["violin", "viola", "cello", "fiddle", "harp", "timpani", "string instrument"],
    "ensemble": ["string section", "string ensemble", "violin section", "cello section", "orchestra",
                 "orchestral strings", "string quartet"],
    "brass": ["trumpet", "trombone", "french horn", "horn section", "horns", "tuba", "cornet", "euphonium",
              "flugelhorn", "brass section"],
    "reed": ["saxophone", "sax", "alto saxophone", "tenor saxophone", "baritone saxophone", "soprano saxophone",
             "clarinet", "bass clarinet", "oboe", "english horn", "bassoon"],
    "pipe": ["flute", "piccolo", "recorder", "pan flute", "panpipes", "whistle", "ocarina"],
    "synth lead": ["lead synth", "synth lead", "synthesizer lead", "theremin"],
    "synth pad": ["synth pad", "pad", "synthesizer", "synth", "synthesizers", "synths"],
    "synth effects": ["processed sound", "sound effect synth"],
    "ethnic": ["banjo", "sitar", "bagpipe", "bagpipes", "shamisen", "koto", "kalimba"],
    "sound effects": ["crowd noise", "applause", "scratches", "scratching", "sound effects"],
    "drums": ["drum kit", "drum set", "drum", "percussion", "drum machine", "kick drum", "snare drum", "snare",
              "hi hat", "hi-hat", "cymbals", "cymbal", "tambourine", "congas", "bongos", "shaker"],
    "vocals": ["vocal", "voice", "voices", "singer", "singers", "singing", "lead vocals", "backing vocals", "choir",
               "rap", "rapping", "vocalist", "vocalists", "sung"],
}

DEMO = {
    "piano": [],
    "guitar": [],
    "organ": [],
    "strings": ["string section", "violin", "violins", "string ensemble"],
    "bass": ["bass guitar", "electric bass", "bass line"],
    "synth_bass": ["synth bass", "synthesizer bass", "bass synth"],
    "synth_lead": ["synth lead", "lead synth", "lead synthesizer", "synthesizer lead"],
    "synth_pad": ["synth pad", "pad", "synthesizer pad"],
    "drums": ["drum kit", "drum", "percussion"],
}

VOCABULARIES: dict[str, dict[str, list[str]]] = {"musicnet": MUSICNET, "general_midi": GENERAL_MIDI, "demo": DEMO}


def validate(reference_sets: Sequence[AbstractSet[str]], estimated_sets: Sequence[AbstractSet[str] | None],
             vocabulary: Mapping[str, Sequence[str]]) -> None:
    """Raise ValueError for unequal lengths or a label outside the vocabulary."""
    if len(reference_sets) != len(estimated_sets):
        raise ValueError(f"{len(reference_sets)} reference sets but {len(estimated_sets)} estimates")
    for kind, sets in (("reference", reference_sets), ("estimated", estimated_sets)):
        for s in sets:
            if s is None:
                if kind == "reference":
                    raise ValueError("a reference instrument set is None")
                continue
            unknown = set(s) - set(vocabulary)
            if unknown:
                raise ValueError(f"{kind} instruments {sorted(unknown)} are not in the vocabulary {sorted(vocabulary)}")


def counts(reference: AbstractSet[str], estimate: AbstractSet[str] | None) -> tuple[int, int, int]:
    """``(TP, FP, FN)`` of one item; a None estimate finds nothing."""
    estimate = set() if estimate is None else set(estimate)
    return len(reference & estimate), len(estimate - reference), len(reference - estimate)


def item_f1(reference: AbstractSet[str], estimate: AbstractSet[str] | None) -> float:
    tp, fp, fn = counts(reference, estimate)
    return stats.micro_f1_counts(np.array([tp]), np.array([fp]), np.array([fn]))


def evaluate(reference_sets: Sequence[AbstractSet[str]], estimated_sets: Sequence[AbstractSet[str] | None],
             vocabulary: Mapping[str, Sequence[str]]) -> dict:
    """``{"f1": Estimate, "precision", "recall", "f1_per_item": float, "per_label": {...}}``."""
    validate(reference_sets, estimated_sets, vocabulary)
    if not reference_sets:
        raise ValueError("no instrument sets to evaluate")
    tp, fp, fn = (np.array(x) for x in zip(*(counts(set(r), e) for r, e in zip(reference_sets, estimated_sets))))
    t, p, n = int(tp.sum()), int(fp.sum()), int(fn.sum())
    per_label = {}
    for label in vocabulary:
        lt = sum(1 for r, e in zip(reference_sets, estimated_sets) if label in r and e and label in e)
        lp = sum(1 for r, e in zip(reference_sets, estimated_sets) if label not in r and e and label in e)
        ln = sum(1 for r, e in zip(reference_sets, estimated_sets) if label in r and not (e and label in e))
        if lt + lp + ln:
            per_label[label] = {"precision": lt / (lt + lp) if lt + lp else 0.0,
                                "recall": lt / (lt + ln) if lt + ln else 0.0, "support": lt + ln}
    return {
        "f1": stats.f1(tp, fp, fn),
        "precision": t / (t + p) if t + p else 0.0,
        "recall": t / (t + n) if t + n else 0.0,
        "f1_per_item": float(np.mean([item_f1(set(r), e) for r, e in zip(reference_sets, estimated_sets)])),
        "per_label": per_label,
    }


# ---------------------------------------------------------------------------------------------
# The evaluation task

def reference(record) -> list[str] | None:
    """The instruments heard in the clip (its labels' ``instruments``: after cropping, those of the
    window the model heard), for clips whose labels name a vocabulary scored here."""
    found = label(record, "instruments")
    if label(record, "instrument_vocabulary") not in VOCABULARIES:
        return None
    return sorted(found) if isinstance(found, list) else None


def clip_vocabulary(record) -> list[str] | None:
    """The labels of the instrument vocabulary the clip's labels name."""
    name = label(record, "instrument_vocabulary")
    return list(VOCABULARIES[name]) if name in VOCABULARIES else None


def group_vocabulary(context) -> dict[str, list[str]]:
    """The vocabulary (label -> the words that name it) of the evaluated group's clips."""
    for vocabulary in VOCABULARIES.values():
        if context.vocabulary is not None and list(vocabulary) == list(context.vocabulary):
            return vocabulary
    raise EvalConfigError(f"instruments/{context.dataset}: the clips name no instrument vocabulary of "
                          f"{', '.join(VOCABULARIES)}")


def parse(rows, context) -> list[list[str] | None]:
    vocabulary = group_vocabulary(context)
    found = [parse_instruments(r["answer"], vocabulary) for r in rows]
    return [sorted(f) if f is not None else None for f in found]


def score(rows, context) -> tuple[list[dict], dict]:
    vocabulary = group_vocabulary(context)
    refs, parsed = columns(rows)
    found = [set(p) if p is not None else None for p in parsed]
    ref_sets = [set(r) & set(vocabulary) for r in refs]
    outside = sorted({x for r in refs for x in r} - set(vocabulary))
    if outside:
        log.warning("evaluate: instruments/%s: reference labels outside the vocabulary are not scored: %s",
                    context.dataset, ", ".join(outside))
    per_row = [{"score": item_f1(r, f)} for r, f in zip(ref_sets, found)]
    return per_row, evaluate(ref_sets, found, vocabulary)


PROMPT = "List the instruments you hear in this clip, including vocals and drums."
TASK = register(Task(name="instruments", prompt=PROMPT, reference=reference, parse=parse, score=score,
                     headline=("f1", "precision", "recall"), vocabulary=clip_vocabulary))
