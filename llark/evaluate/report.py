"""The evaluation report: a summary table (Markdown, also printed) and confusion matrices (PNG).

``report.md`` in the run directory holds: what was evaluated (model, clips, prompts, decoding),
one table with every task's headline metrics for real audio and, when run, for the
shuffled-audio control (value and 95% interval, items, unparseable answers), the genre
embedding model, and the confusion matrices of the tasks that define one, key and genre
(``confusion_<task>_<dataset>_<condition>.png``: rows are references, columns the parsed answers,
the last column the unparseable ones).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from llark.evaluate import tasks as registry
from pipeline.files import write_text

UNPARSEABLE = "(unparseable)"


def _format(value: Any) -> str:
    if isinstance(value, dict) and "value" in value:
        return f"{value['value']:.3f} [{value['low']:.3f}, {value['high']:.3f}]"
    if isinstance(value, (int, float)):
        return f"{value:.3f}"
    return "–"


def summary_rows(summary: dict) -> list[dict[str, str]]:
    """One row per (task, dataset, metric): the real and shuffled values, n and unparseable counts."""
    headlines = {task.name: task.headline for task in registry.registered()}
    conditions = summary["conditions"]
    groups = sorted({g for c in conditions.values() for g in c})
    rows = []
    for group in groups:
        task, dataset = group.split("/", 1)
        real = conditions.get("real", {}).get(group, {})
        shuffled = conditions.get("shuffled", {}).get(group)
        if "unavailable" in real:
            rows.append({"task": task, "dataset": dataset, "metric": "(not scored)", "real": real["unavailable"],
                         "shuffled": "", "n": str(real.get("n", "")), "unparseable": ""})
            continue
        for metric in headlines.get(task, ()):
            unparseable = f"{real.get('unparseable', 0)}"
            if shuffled is not None:
                unparseable += f" / {shuffled.get('unparseable', 0)}"
            rows.append({
                "task": task, "dataset": dataset, "metric": metric, "real": _format(real.get(metric)),
                "shuffled": _format(shuffled.get(metric)) if shuffled is not None else "",
                "n": str(real.get("n", "")), "unparseable": unparseable,
            })
    return rows


def summary_table(summary: dict) -> str:
    """The summary as a Markdown table (also readable as plain text)."""
    has_control = "shuffled" in summary["conditions"]
    header = ["task", "dataset", "metric", "real audio [95% CI]"]
    if has_control:
        header.append("shuffled audio [95% CI]")
    header += ["n", "unparseable" + (" (real / shuffled)" if has_control else "")]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in summary_rows(summary):
        cells = [row["task"], row["dataset"], row["metric"], row["real"]]
        if has_control:
            cells.append(row["shuffled"])
        cells += [row["n"], row["unparseable"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def confusion(references: Sequence[str], predictions: Sequence[str | None], labels: Sequence[str]) -> np.ndarray:
    """Counts ``[len(labels), len(labels) + 1]``: rows references, columns predictions, the last
    column predictions that are None or outside ``labels``."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels) + 1), dtype=np.int64)
    for ref, pred in zip(references, predictions):
        if ref not in index:
            raise ValueError(f"reference {ref!r} is not one of the labels")
        matrix[index[ref], index.get(pred, len(labels)) if pred is not None else len(labels)] += 1
    return matrix


def plot_confusion(matrix: np.ndarray, labels: Sequence[str], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(labels) + [UNPARSEABLE]
    size = max(4.0, 0.32 * len(columns) + 2.0)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1, int(matrix.max())), aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("parsed answer")
    ax.set_ylabel("reference")
    ax.set_title(title, fontsize=9)
    for (r, c), count in np.ndenumerate(matrix):
        if count:
            ax.text(c, r, str(count), ha="center", va="center", fontsize=6,
                    color="white" if count > matrix.max() / 2 else "black")
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def confusion_plots(out_dir: Path, summary: dict, scored_by_condition: dict[str, list[dict]]) -> list[Path]:
    """The confusion matrices of the tasks that define one, per dataset and condition."""
    tasks = {task.name: task for task in registry.registered() if task.confusion is not None}
    paths = []
    for condition, rows in scored_by_condition.items():
        by_group: dict[tuple[str, str], list[dict]] = {}
        for row in rows:
            if row["task"] in tasks:
                by_group.setdefault((row["task"], row["dataset"]), []).append(row)
        for (task, dataset), group in sorted(by_group.items()):
            labels, refs, preds = tasks[task].confusion(group, summary["conditions"][condition][f"{task}/{dataset}"])
            matrix = confusion(refs, preds, labels)
            path = out_dir / f"confusion_{task}_{dataset}_{condition}.png"
            title = f"{task} on {dataset}, {condition} audio ({len(group)} items)"
            paths.append(plot_confusion(matrix, labels, title, path))
    return paths


def write_report(out_dir: Path, summary: dict, scored_by_condition: dict[str, list[dict]]) -> Path:
    """``report.md`` with the table and the confusion matrices."""
    run = summary.get("run") or {}
    plots = confusion_plots(out_dir, summary, scored_by_condition)
    lines = ["# LLark evaluation", ""]
    if run:
        lines += [f"- model: `{run.get('checkpoint')}`",
                  f"- clips: `{run.get('clips')}` (splits: {', '.join(run.get('splits') or ['all'])}); "
                  f"embeddings: `{run.get('embeddings')}`",
                  f"- decoding: {run.get('generation') or 'greedy'}"]
        for task, prompt in sorted((run.get("prompts") or {}).items()):
            if task in (run.get("tasks") or []):
                lines.append(f"- {task} prompt: \"{prompt}\"")
    if summary.get("genre_embedding_model"):
        lines.append(f"- genre embedding model: {summary['genre_embedding_model']}")
    lines += ["", "## Results", "", summary_table(summary), "",
              "Accuracies have 95% Clopper-Pearson intervals; mean scores (MIREX, beat F-measure) and F1 have "
              "95% bootstrap intervals (10,000 resamples of the items). An unparseable answer counts as wrong.",
              ""]
    if "shuffled" in summary["conditions"]:
        lines += ["The shuffled-audio control asks the same questions with each clip's embedding replaced by "
                  "another clip's: a model that uses the audio falls to chance there.", ""]
    if plots:
        lines += ["## Confusion matrices", ""]
        for p in plots:
            lines += [f"![{p.stem}]({p.name})", ""]
    return write_text(out_dir / "report.md", "\n".join(lines) + "\n")
