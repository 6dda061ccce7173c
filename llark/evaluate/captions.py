"""Captioning: BLEU-1..4, METEOR, ROUGE-L and CIDEr, as the COCO caption toolkit computes them.

Conventions
-----------
Each item has one or more reference captions and one generated caption (an empty answer is
scored as an empty caption and counted as unparseable). Captions are lower-cased and tokenised
with the toolkit's Stanford PTB tokenizer, which also drops punctuation, before scoring.

Metrics (``pycocoevalcap`` 1.2, the code of Chen et al., "Microsoft COCO Captions: Data Collection
and Evaluation Server", 2015, which LLark's Table 6 and most audio-captioning work report):

- **bleu_1** .. **bleu_4**: corpus-level BLEU with the closest reference length (Papineni et al.,
  ACL 2002);
- **meteor**: METEOR 1.5 (Denkowski & Lavie, 2014), English, with its stemming, synonym and
  paraphrase modules (the paraphrase table ships inside ``pycocoevalcap``);
- **rouge_l**: ROUGE-L F-measure with beta 1.2, averaged over items (Lin, 2004);
- **cider**: CIDEr-D, the toolkit's "CIDEr" (Vedantam et al., CVPR 2015), with document
  frequencies from the evaluated references.

The PTB tokenizer and METEOR are Java programs: they need a Java runtime (``java`` on PATH, 8 or
later; ``apt-get install default-jre-headless``). Without one, :func:`evaluate` raises
:class:`MetricUnavailable` saying so, and ``llark evaluate`` reports the captioning task as not
scored. These are corpus-level metrics; no confidence interval is given (a bootstrap would
rerun METEOR's Java process per resample). SPICE is left out (it needs Stanford CoreNLP models
that the package downloads at run time). CMI-Bench's BERTScore is not computed.
"""

from __future__ import annotations

import shutil
from typing import Sequence

from llark.errors import LlarkError
from llark.evaluate.tasks import Task, columns, each, label, register


class MetricUnavailable(LlarkError, RuntimeError):
    """A metric whose implementation cannot run here; the message says what to install."""


METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")


def validate(references: Sequence[Sequence[str]], candidates: Sequence[str | None]) -> None:
    """Raise ValueError for unequal lengths or an item without a non-empty reference caption."""
    if len(references) != len(candidates):
        raise ValueError(f"{len(references)} reference lists but {len(candidates)} candidates")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
            raise ValueError(f"item {i}: references must be a non-empty list of non-empty captions, got {refs!r}")
    for i, c in enumerate(candidates):
        if c is not None and not isinstance(c, str):
            raise ValueError(f"item {i}: candidate {c!r} is not a string")


def check_available() -> None:
    """Raise MetricUnavailable when pycocoevalcap or a Java runtime is missing."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise MetricUnavailable("captioning metrics need pycocoevalcap: pip install 'llark[eval]' "
                                "(pycocoevalcap==1.2)") from None
    if shutil.which("java") is None:
        raise MetricUnavailable("captioning metrics need a Java runtime for the COCO toolkit's PTB tokenizer "
                                "and METEOR 1.5: apt-get install default-jre-headless (or any Java >= 8 on PATH)")


def evaluate(references: Sequence[Sequence[str]], candidates: Sequence[str | None]) -> dict:
    """``{"bleu_1": float, ..., "cider": float, "per_item": {"bleu_4": [...], "meteor": [...], ...}}``."""
    validate(references, candidates)
    if not references:
        raise ValueError("no captions to evaluate")
    check_available()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    keys = [str(i) for i in range(len(references))]
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": r} for r in refs] for k, refs in zip(keys, references)})
    res = tokenizer.tokenize({k: [{"caption": c or ""} for c in [cand]] for k, cand in zip(keys, candidates)})
    # METEOR's Java process reads one line per item; an empty hypothesis must still be a token.
    res = {k: [v[0] if v and v[0].strip() else "."] for k, v in res.items()}
    out: dict = {}
    per_item: dict = {}
    bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        out[f"bleu_{n + 1}"] = float(bleu[n])
    per_item["bleu_4"] = [float(x) for x in bleu_items[3]]
    for name, scorer in (("meteor", Meteor()), ("rouge_l", Rouge()), ("cider", Cider())):
        score, items = scorer.compute_score(gts, res)
        out[name] = float(score)
        per_item[name] = [float(x) for x in items]
    out["per_item"] = per_item
    return out


# ---------------------------------------------------------------------------------------------
# The evaluation task


def reference(record) -> list[str] | None:
    """The clip's reference captions (its labels' ``caption``)."""
    caption = label(record, "caption")
    return [caption] if isinstance(caption, str) and caption.strip() else None


def score(rows, context) -> tuple[list[dict], dict]:
    refs, parsed = columns(rows)
    try:
        result = evaluate(refs, parsed)
    except MetricUnavailable as exc:
        return [{"score": None} for _ in rows], {"unavailable": str(exc)}
    per_item = result.pop("per_item")
    per_row = [{"score": per_item["meteor"][i], **{k: v[i] for k, v in per_item.items()}} for i in range(len(rows))]
    return per_row, result


TASK = register(Task(name="captions", prompt="Describe the contents of the provided audio in detail.",
                     reference=reference, parse=each(lambda answer: answer if answer and answer.strip() else None),
                     score=score, headline=("bleu_4", "meteor", "rouge_l", "cider"), max_new_tokens=256))
