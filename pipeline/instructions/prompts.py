"""The prompt set: system prompts per (dataset, task family), caption questions, filter phrases.

Everything lives as plain files under a prompts directory (``prompts/`` at the top of the
repository); ``prompts/prompts.yaml`` says how a system prompt is assembled from them and holds
the set's version. A prompt's version, recorded with every output and part of the reply cache's
key, is ``v<version>-<digest>``: the digest covers the assembled text and the format of the JSON
sent with it (``metadata.METADATA_FORMAT_VERSION``), so a changed text is never mistaken for the
old one.

The directory is found, in order: ``--prompts-dir``, ``$LLARK_PROMPTS_DIR``, ``prompts/`` beside
the ``pipeline`` package (a source checkout), ``./prompts`` (a container's working directory).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.instructions.metadata import METADATA_FORMAT_VERSION
from pipeline.records import TASK_FAMILIES
from pipeline.runner import StageConfigError

MANIFEST = "prompts.yaml"


class PromptConfigError(StageConfigError):
    """The prompts directory is missing, incomplete or malformed."""


@dataclass(frozen=True)
class PromptSet:
    root: Path
    version: str
    sections: tuple[str, ...]
    datasets: dict[str, tuple[str, ...]]
    captions_as_given: tuple[str, ...]
    caption_questions: tuple[str, ...]
    question_phrases: tuple[str, ...]
    answer_phrases: tuple[str, ...]
    prices_path: Path

    def has_prompt(self, dataset: str, family: str) -> bool:
        return family in self.datasets.get(dataset, ())

    def system_prompt(self, dataset: str, family: str) -> str:
        if not self.has_prompt(dataset, family):
            raise KeyError(f"no {family} prompt for dataset {dataset!r} in {self.root / MANIFEST}")
        parts = []
        for section in self.sections:
            optional = section.endswith("?")
            name = section.rstrip("?").format(dataset=dataset, family=family)
            path = self.root / name
            if not path.is_file():
                if optional:
                    continue
                raise PromptConfigError(f"prompt file {path} is missing (section {section!r} of {self.root / MANIFEST})")
            parts.append(path.read_text(encoding="utf-8").strip())
        return "\n\n".join(p for p in parts if p) + "\n"

    def prompt_version(self, dataset: str, family: str) -> str:
        text = f"metadata-format {METADATA_FORMAT_VERSION}\n{self.system_prompt(dataset, family)}"
        return f"v{self.version}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:8]}"

    def all_prompt_versions(self) -> dict[str, str]:
        return {f"{d}/{f}": self.prompt_version(d, f) for d, fams in sorted(self.datasets.items()) for f in fams}


def find_prompts_dir(explicit: str | os.PathLike | None = None) -> Path:
    candidates: list[tuple[str, Path]] = []
    if explicit:
        candidates.append(("--prompts-dir", Path(explicit)))
    elif os.environ.get("LLARK_PROMPTS_DIR"):
        candidates.append(("LLARK_PROMPTS_DIR", Path(os.environ["LLARK_PROMPTS_DIR"])))
    else:
        candidates.append(("the source checkout", Path(__file__).resolve().parents[2] / "prompts"))
        candidates.append(("the working directory", Path.cwd() / "prompts"))
    for _, path in candidates:
        if (path / MANIFEST).is_file():
            return path
    where = "; ".join(f"{label}: {path}" for label, path in candidates)
    raise PromptConfigError(
        f"no prompts directory with {MANIFEST} found ({where}); pass --prompts-dir or set LLARK_PROMPTS_DIR"
    )


def load_prompt_set(root: str | os.PathLike | None = None) -> PromptSet:
    """Read and check the prompt set: every declared prompt must assemble from existing files."""
    root = find_prompts_dir(root)
    manifest_path = root / MANIFEST
    try:
        manifest = yaml.safe_load(manifest_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise PromptConfigError(f"{manifest_path} is not valid YAML: {exc}") from None
    for key in ("version", "sections", "datasets", "caption_questions", "filters", "prices"):
        if key not in manifest:
            raise PromptConfigError(f"{manifest_path} has no {key!r}")
    datasets = {}
    for dataset, families in (manifest["datasets"] or {}).items():
        unknown = [f for f in families or [] if f not in TASK_FAMILIES]
        if unknown:
            raise PromptConfigError(f"{manifest_path}: dataset {dataset} lists unknown task families {unknown}")
        datasets[str(dataset)] = tuple(families or [])
    filters = manifest["filters"] or {}
    prompt_set = PromptSet(
        root=root,
        version=str(manifest["version"]),
        sections=tuple(str(s) for s in manifest["sections"]),
        datasets=datasets,
        captions_as_given=tuple(manifest.get("captions_as_given") or ()),
        caption_questions=read_lines(root / manifest["caption_questions"]),
        question_phrases=read_lines(root / filters.get("question_phrases", "")),
        answer_phrases=read_lines(root / filters.get("answer_phrases", "")),
        prices_path=root / manifest["prices"],
    )
    if not prompt_set.caption_questions:
        raise PromptConfigError(f"{root / manifest['caption_questions']} holds no questions")
    for dataset, families in datasets.items():
        for family in families:
            prompt_set.system_prompt(dataset, family)
    return prompt_set


def read_lines(path: Path) -> tuple[str, ...]:
    """Non-blank lines of a list file, whitespace collapsed, without comments ('#' at the start of
    a line or after a space, so that 'F# minor' is kept)."""
    if not path.is_file():
        raise PromptConfigError(f"list file {path} is missing")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = re.sub(r"\s+", " ", re.sub(r"(^|\s)#.*$", "", line)).strip()
        if line:
            out.append(line)
    return tuple(out)
