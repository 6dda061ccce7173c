"""What the stages hand each other, defined once: producers and consumers import it from here.

- the **clip record** (``pipeline.records.ClipRecord``, re-exported here) and its ``labels``;
- the **instruction record** (``InstructionRecord``): one clip, one task family, its Q/A pairs and
  where they came from; the instructions stage writes exactly these fields, shards and every other
  reader validates them with the same model;
- the **shard sample**: its key (``sample_key``), its members (``<key>.npy``, ``<key>.json``) and
  the JSON member's layout (``SampleJson``);
- the names of the **features** the augment stage writes, and of the **files** each stage leaves
  in its output directory.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.records import CROP_POLICIES, SPLITS, TASK_FAMILIES, ClipRecord  # noqa: F401 (re-exported)

# Estimated features (``ClipRecord.features``), each named after its estimator.
TEMPO = "tempo_in_beats_per_minute_madmom"
KEY = "key_madmom"
CHORDS = "chords_madmom"
BEAT_GRID = "beat_grid_madmom"
UNAVAILABLE = "unavailable"  # {feature: why it is missing}
FEATURE_NAMES = (TEMPO, KEY, CHORDS, BEAT_GRID)

# Files beside a stage's outputs.
ENCODER_JSON = "encoder.json"  # what encoded the embeddings (embed, shards)
EMBEDDINGS_JSONL = "embeddings.jsonl"  # one line per embedded clip (embed)
INDEX_JSON = "index.json"  # the shards of a shards directory, by split and family
MISSING_JSONL = "missing.jsonl"  # what could not become a sample, with the reason
PLAN_JSONL = "plan.jsonl"
SAMPLES_JSONL = "samples.jsonl"
SHARDS_JSONL = "shards.jsonl"

# Who wrote an instruction record's pairs: the offline template writer, an OpenAI-compatible
# chat API or the Batch API, or the dataset itself (captions as given).
INSTRUCTION_BACKENDS = ("template", "openai", "openai-batch", "given")

TaskFamily = Literal["understanding", "captioning", "reasoning"]


class QAPair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, pattern=r"\S")
    answer: str = Field(min_length=1, pattern=r"\S")


class InstructionRecord(BaseModel):
    """The instructions stage's output line: one clip, one task family, its Q/A pairs."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="'<clip_id>-<task_family>', also the shard sample's key")
    clip_id: str
    task_family: TaskFamily
    pairs: list[QAPair]
    backend: Literal["template", "openai", "openai-batch", "given"]
    model: str
    prompt_version: str
    dataset: str
    split: Literal["train", "valid", "test"]


INSTRUCTION_FIELDS = tuple(InstructionRecord.model_fields)


def sample_key(clip_id: str, task_family: str) -> str:
    """The shard sample key (and instruction record id) of a clip's task family."""
    return f"{clip_id}-{task_family}"


class SampleEncoding(BaseModel):
    model_config = ConfigDict(extra="forbid")

    encoder: str
    layer: int | str | None  # one hidden state, "A-B" (their mean) or "all" (every state kept)
    frame_rate_hz: float
    frames: int = Field(ge=1)
    dim: int = Field(ge=1)
    dtype: Literal["float16", "float32"]


class SampleInstructions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    backend: str | None
    model: str | None
    prompt_version: str | None


class SampleJson(BaseModel):
    """The ``json`` member of a shard sample (validate-shards checks every one against this)."""

    model_config = ConfigDict(extra="forbid")

    key: str
    clip_id: str
    task_family: TaskFamily
    split: Literal["train", "valid", "test"]
    clip: dict[str, Any]
    pairs: list[QAPair] = Field(min_length=1)
    instructions: SampleInstructions
    encoding: SampleEncoding | None = None
    # Samples of several encoders (pipeline.shard_encoders): each one's encoding by name, no ``encoding``.
    encodings: dict[str, SampleEncoding] | None = None

    @model_validator(mode="after")
    def _one_layout(self) -> "SampleJson":
        if (self.encoding is None) == (self.encodings is None):
            raise ValueError("a sample has either 'encoding' (one encoder) or 'encodings' (several)")
        return self
