"""Training batches from the shards stage's webdataset shards.

Input: one or more shard directories written by ``llark shards``, each with its ``index.json``
(every shard with its split, task family and sample count) and ``encoder.json`` (the encoder's
name, layer, frame rate, dimension and dtype). :func:`open_shards` reads both and
:func:`check_encoder` refuses shards whose frames do not fit the projector, before any training.

Splitting without duplicates. In epoch ``e`` the shard list is permuted with ``(seed, e)`` and
global worker ``g = rank * num_workers + worker`` reads shards ``g, g + G, g + 2G, ...`` of that
permutation (``G = world_size * num_workers``): within an epoch every shard, hence every sample,
goes to exactly one worker. There must be at least ``G`` shards. Each worker's stream is endless
(epoch after epoch), so no rank runs out of batches before another (training is counted in
steps), and each worker's epoch holds each of its samples once.

Shuffling. Shards are shuffled per epoch; a worker reads its shards in groups of
``group_shards``, interleaving the group's shards at random, through a shuffle buffer of
``buffer_size`` examples that is drained at the end of the group. The shards stage has already
shuffled samples within each (split, family) set. Memory per worker: about ``buffer_size``
embeddings (a 25 s Jukebox clip in float16 is 2.4 MB).

Exact resume. A worker's stream is a pure function of (seed, epoch, group, worker); every batch
carries the position after it (epoch, group, examples of the group consumed) and its logical
worker id. Resuming skips whole groups without reading them and replays only the current group
(at most ``group_shards`` shards). DataLoader workers hand out batches in turn, so the worker ids
are rotated on resume to keep the order of an uninterrupted run.

Examples. A sample's Q/A pairs become one example each (``conversation="pair"``, the paper's
setting) or one multi-turn conversation (``"multi_turn"``; trailing rounds are dropped to fit
``max_seq_len``). See :mod:`llark.model.chat` for the rendering and the loss mask.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from llark.errors import LlarkConfigError, LlarkError
from llark.model.chat import IGNORE_INDEX, ChatFormatError, ChatFormatter
from llark.model.llark import pool_frames
from pipeline.contracts import INDEX_JSON
from pipeline.shard_reader import iter_samples

log = logging.getLogger("llark")

CONVERSATIONS = ("pair", "multi_turn")


class DataConfigError(LlarkConfigError):
    """Shards that cannot be used for this training run; raised before training starts."""


class BadSample(LlarkError, ValueError):
    """One sample that cannot become a training example (named by its key)."""


class SampleTooLong(BadSample):
    """A sample whose shortest conversation (one pair) is longer than ``data.max_seq_len``."""


# ---------------------------------------------------------------------------------------------
# The shard format (the one place that knows the shards stage's sample layout)


@dataclass
class ShardSample:
    key: str
    pairs: list[tuple[str, str]]
    npy: bytes | None
    frames: int | None  # as recorded in the sample's json, checked against the array when decoded
    # Every array member by extension (``npy``, or ``<encoder>.npy`` in shards of several encoders) and
    # the frames its json records (llark/multi_encoder.py reads them).
    arrays: dict[str, bytes] = field(default_factory=dict)
    frames_by: dict[str, int | None] = field(default_factory=dict)


def read_sample(raw: dict[str, Any]) -> ShardSample:
    """A raw webdataset sample (``__key__``, ``npy`` and ``json`` bytes) → key, Q/A pairs, embedding bytes.

    The json holds ``pairs`` (``[{"question", "answer"}, ...]``) and ``encoding.frames``
    (pipeline/shards.py); the npy is ``[frames, dim]`` float16/float32 and is decoded later with
    pickles disallowed (:func:`decode_audio`).
    """
    key = raw.get("__key__", "?")
    arrays = {k: v for k, v in raw.items() if k == "npy" or (k.endswith(".npy") and not k.startswith("__"))}
    if not arrays or "json" not in raw:
        raise BadSample(f"sample {key}: expected .npy and .json members, found {sorted(k for k in raw if not k.startswith('__'))}")
    try:
        meta = json.loads(raw["json"])
        pairs = [(str(p["question"]), str(p["answer"])) for p in meta["pairs"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise BadSample(f"sample {key}: json without a list of question/answer pairs ({exc})") from None
    if not pairs:
        raise BadSample(f"sample {key}: no question/answer pair")
    frames = (meta.get("encoding") or {}).get("frames")
    frames_by = {f"{name}.npy": (e or {}).get("frames") for name, e in (meta.get("encodings") or {}).items()}
    return ShardSample(key=key, pairs=pairs, npy=raw.get("npy"), frames=frames, arrays=arrays, frames_by=frames_by)


def decode_audio(sample: ShardSample, dim: int, states: int | None = None) -> np.ndarray:
    """The embedding as ``[frames, dim]``, or, for embeddings that keep ``states`` hidden states
    (stored ``[states, frames, dim]``), as ``[frames, states, dim]``, frames first as every array
    the model side handles; a pickled, misshapen or non-finite array is a BadSample."""
    try:
        array = load_npy(sample.npy)
    except ValueError as exc:
        raise BadSample(f"sample {sample.key}: unreadable .npy ({exc})") from None
    stored = (states, "frames", dim) if states else ("frames", dim)
    if array.dtype not in (np.float16, np.float32) or array.ndim != len(stored) or array.shape[-1] != dim \
            or array.shape[-2] < 1 or (states and array.shape[0] != states):
        raise BadSample(f"sample {sample.key}: embedding {array.dtype} {array.shape}, expected "
                        f"[{', '.join(map(str, stored))}] float")
    if sample.frames is not None and array.shape[-2] != sample.frames:
        raise BadSample(f"sample {sample.key}: {array.shape[-2]} frames, its json says {sample.frames}")
    if not all_finite(array):
        raise BadSample(f"sample {sample.key}: NaN or infinite values in the embedding")
    return array.transpose(1, 0, 2) if states else array


_NPY_HEADERS: dict[bytes, tuple[tuple[int, ...], bool, np.dtype]] = {}


def load_npy(data: bytes) -> np.ndarray:
    """``np.load(io.BytesIO(data), allow_pickle=False)``, parsing each distinct header once (a shard
    set's embeddings share a few shapes, and parsing the header costs more than copying the data)."""
    from numpy.lib import format as npy

    f = io.BytesIO(data)
    version = npy.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        return np.load(io.BytesIO(data), allow_pickle=False)
    size = 2 if version == (1, 0) else 4
    offset = 8 + size + int.from_bytes(data[8:8 + size], "little")
    header = data[:offset]
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        parsed = read(f)
        if parsed[2].hasobject:
            raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
        if len(_NPY_HEADERS) >= 1024:
            _NPY_HEADERS.clear()
        _NPY_HEADERS[header] = parsed
    shape, fortran, dtype = parsed
    array = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset).copy()
    return array.reshape(shape[::-1]).transpose() if fortran else array.reshape(shape)


def all_finite(array: np.ndarray) -> bool:
    if array.dtype == np.float16:
        # Without native float16 arithmetic np.isfinite converts every value; inf and NaN are exactly
        # the float16 values whose five exponent bits are all set.
        return not np.any((array.view(np.uint16) & 0x7C00) == 0x7C00)
    return bool(np.isfinite(array).all())


def iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar shard (a path, or any URL webdataset's gopen reads: pipe:, http, s3 ...);
    a truncated or corrupt shard, or a pickled member, raises a ShardReadError naming the shard."""
    yield from iter_samples(url)


def frame_statistics(urls: list[str], encoder_dim: int, frame_pool: int = 1,
                     max_samples: int = 512, states: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-dimension mean and standard deviation of the audio tokens the projector will see (the
    frames pooled by ``frame_pool``; with ``states``, the mean of the states, as a new layer mix
    gives), over the first ``max_samples`` samples of ``urls`` in order, so that every rank
    computes the same figures. Returns ``(mean, std, samples read)``."""
    total = np.zeros(encoder_dim, dtype=np.float64)
    squares = np.zeros(encoder_dim, dtype=np.float64)
    tokens = samples = 0
    for raw in itertools.chain.from_iterable(iter_shard(url) for url in urls):
        try:
            audio = pool_frames(decode_audio(read_sample(raw), encoder_dim, states), frame_pool).astype(np.float64)
            if states:
                audio = audio.mean(axis=1)
        except BadSample as exc:
            log.warning("frame statistics: skipping %s", exc)
            continue
        total += audio.sum(axis=0)
        squares += np.square(audio).sum(axis=0)
        tokens += audio.shape[0]
        samples += 1
        if samples >= max_samples:
            break
    if not tokens:
        raise DataConfigError(f"no readable sample in {len(urls)} shards to compute the frames' statistics from")
    mean = total / tokens
    std = np.sqrt(np.maximum(squares / tokens - np.square(mean), 0.0))
    return mean.astype(np.float32), std.astype(np.float32), samples


# ---------------------------------------------------------------------------------------------
# Shard sets and the encoder check


@dataclass
class ShardSet:
    urls: list[str]
    samples: int
    manifest: dict[str, Any]
    dirs: list[str]
    entries: list[dict[str, Any]] = field(default_factory=list)  # index.json's entry of each shard, with its url

    @property
    def states(self) -> int | None:
        """Hidden states per stored frame (``--layers all``); None for ``[frames, dim]`` embeddings."""
        from pipeline.encoders import stored_states

        return stored_states(self.manifest)


def open_shards(dirs: list[str], split: str = "train", families: list[str] | None = None) -> ShardSet:
    """The shards of ``split`` (and ``families``) listed in each directory's index.json."""
    from pipeline.encoders import IDENTITY_FIELDS, describe_differences, manifest_differences, read_manifest
    from pipeline.runner import StageConfigError

    if not dirs:
        raise DataConfigError("data.shards: give at least one shards directory")
    urls, samples, manifest, entries = [], 0, None, []
    for d in dirs:
        index_path = Path(d) / INDEX_JSON
        if not index_path.is_file():
            raise DataConfigError(f"data.shards: {index_path} does not exist; the shards stage writes it when "
                                  "every shard is written (rerun `llark shards` to finish)")
        try:
            from pipeline.shard_encoders import multi_manifest_of, read_shard_encoders

            several = read_shard_encoders(d)  # shards of several encoders: llark/multi_encoder.py picks
            found = multi_manifest_of(several) if several else read_manifest(d)
        except StageConfigError as exc:
            raise DataConfigError(f"data.shards: {exc}") from None
        if manifest is None:
            manifest = found
        elif differences := manifest_differences(manifest, found, ("encoders",) if several else IDENTITY_FIELDS):
            raise DataConfigError(f"data.shards: {d} holds embeddings of another encoder than {dirs[0]}: "
                                  + describe_differences(differences))
        index = json.loads(index_path.read_text(encoding="utf-8"))
        for shard in index["shards"]:
            if shard["split"] == split and (not families or shard["task_family"] in families):
                path = Path(d) / shard["file"]
                if not path.is_file():
                    raise DataConfigError(f"data.shards: {path} is listed in {index_path} but missing")
                urls.append(str(path))
                entries.append({**shard, "url": str(path)})
                samples += int(shard["samples"])
    if not urls:
        raise DataConfigError(f"data.shards: no {split} shards" + (f" of families {families}" if families else "")
                              + f" in {dirs}")
    return ShardSet(urls=sorted(urls), samples=samples, manifest=manifest, dirs=list(dirs),
                    entries=sorted(entries, key=lambda e: e["url"]))


def check_encoder(manifest: dict[str, Any], encoder_dim: int, trained_on: dict[str, Any] | None = None) -> None:
    """Refuse shards whose frames the projector cannot take (dimension), or, for a projector that was
    already trained, frames from another encoder, layer, frame rate or dtype."""
    from pipeline.encoders import FRAME_FIELDS, describe_differences, manifest_differences

    if manifest["dim"] != encoder_dim:
        raise DataConfigError(
            f"encoder mismatch: the shards hold {manifest['name']} frames of dimension {manifest['dim']} "
            f"(encoder.json), the projector takes {encoder_dim} (model.encoder_dim); train on shards of the "
            "matching encoder, or set model.encoder_dim to match a new projector"
        )
    if trained_on:
        differences = manifest_differences(trained_on, manifest, FRAME_FIELDS)
        if differences:
            raise DataConfigError("encoder mismatch: the projector was trained on other frames than the shards "
                                  "hold: " + describe_differences(differences))


# ---------------------------------------------------------------------------------------------
# Examples and batches


class ExampleEncoder:
    """A sample (and optionally one of its pairs) → ``input_ids``, ``labels`` and ``audio``."""

    def __init__(self, formatter: ChatFormatter, encoder_dim: int, max_seq_len: int,
                 system_prompt: str | None = None, frame_pool: int = 1,
                 audio_tokens: Callable[[int], int] | None = None, states: int | None = None):
        self.formatter = formatter
        self.encoder_dim, self.states = encoder_dim, states
        self.max_seq_len = max_seq_len
        self.system_prompt = system_prompt
        self.frame_pool = frame_pool
        # The connector's audio tokens for a clip's (pooled) frames: one per frame unless it says otherwise.
        self.audio_tokens = audio_tokens or (lambda frames: frames)

    def decode(self, sample: ShardSample) -> Any:
        return pool_frames(decode_audio(sample, self.encoder_dim, self.states), self.frame_pool)

    def frames_of(self, audio: Any) -> Any:
        """What the connector counts its tokens from (llark/multi_encoder.py: each encoder's frames)."""
        return audio.shape[0]

    def __call__(self, sample: ShardSample, pair: int | None) -> dict[str, Any]:
        audio = self.decode(sample)
        audio_tokens = self.audio_tokens(self.frames_of(audio))
        pairs = sample.pairs if pair is None else [sample.pairs[pair]]
        asked = len(pairs)
        while True:
            messages = self.formatter.conversation(pairs, self.system_prompt)
            try:
                encoded = self.formatter.encode(messages, audio_tokens)
            except ChatFormatError as exc:
                raise BadSample(f"sample {sample.key}: {exc}") from None
            if len(encoded.input_ids) <= self.max_seq_len:
                break
            if len(pairs) == 1:
                raise SampleTooLong(f"sample {sample.key}: {len(encoded.input_ids)} tokens "
                                    f"({audio_tokens} audio tokens) > data.max_seq_len "
                                    f"{self.max_seq_len}")
            pairs = pairs[:-1]  # a multi-turn conversation loses its last turns until it fits
        return {"key": sample.key, "input_ids": encoded.input_ids, "labels": encoded.labels, "audio": audio,
                "dropped_turns": asked - len(pairs)}


def collate(examples: list[dict[str, Any]], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """Right-padded tensors; padding is marked by lengths (attention mask 0, label IGNORE_INDEX), never
    by comparing ids with the pad id (which may equal EOS)."""
    if isinstance(examples[0]["audio"], dict):
        from llark.multi_encoder import collate_encoders

        return collate_encoders(examples, pad_id, pad_to_multiple_of)
    n = len(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    length = -(-max(lengths) // pad_to_multiple_of) * pad_to_multiple_of
    frames = max(1, max(e["audio"].shape[0] for e in examples))
    per_frame = examples[0]["audio"].shape[1:]  # (dim,) or (states, dim)
    # Filled as numpy arrays (a list converts to numpy far faster than to a tensor), shared with torch.
    input_ids = np.full((n, length), pad_id, dtype=np.int64)
    labels = np.full((n, length), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((n, length), dtype=np.int64)
    audio = np.zeros((n, frames, *per_frame), dtype=examples[0]["audio"].dtype)
    audio_frames = np.zeros(n, dtype=np.int64)
    for i, (e, t) in enumerate(zip(examples, lengths)):
        input_ids[i, :t] = e["input_ids"]
        labels[i, :t] = e["labels"]
        attention_mask[i, :t] = 1
        f = e["audio"].shape[0]
        audio[i, :f] = e["audio"]
        audio_frames[i] = f
    return {
        "input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
        "labels": torch.from_numpy(labels), "audio": torch.from_numpy(audio),
        "audio_frames": torch.from_numpy(audio_frames), "keys": [e["key"] for e in examples],
        "tokens": sum(lengths), "supervised": int(np.count_nonzero(labels != IGNORE_INDEX)),
        "dropped_turns": sum(e.get("dropped_turns", 0) for e in examples),
    }


# ---------------------------------------------------------------------------------------------
# The stream


@dataclass
class Position:
    """Where a logical worker's stream continues: ``offset`` examples of ``group`` in ``epoch`` are done."""

    epoch: int = 0
    group: int = 0
    offset: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "group": self.group, "offset": self.offset}


def worker_shards(n_shards: int, epoch: int, seed: int, global_worker: int, global_workers: int) -> list[int]:
    """The shard indices one global worker reads in one epoch (a disjoint cover of all shards)."""
    order = np.random.default_rng([seed, epoch]).permutation(n_shards)
    return [int(i) for i in order[global_worker::global_workers]]


def compile_question_filter(pattern: str | None) -> re.Pattern | None:
    """``data.questions`` as a case-insensitive regular expression (None: every pair)."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise DataConfigError(f"data.questions: {pattern!r} is not a regular expression ({exc})") from None


@dataclass
class StreamSettings:
    micro_batch: int
    pad_id: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    group_shards: int = 4
    buffer_size: int = 256
    conversation: str = "pair"
    on_bad_sample: str = "error"  # or "skip": counted and logged
    on_too_long: str = "skip"  # or "error"; a sample longer than max_seq_len is counted apart
    pad_to_multiple_of: int = 1
    questions: str | None = None  # a regular expression: only Q/A pairs whose question matches
    epochs: int | None = None  # None: endless
    start: dict[int, dict[str, int]] = field(default_factory=dict)  # logical worker → Position dict
    rotation: int = 0  # logical worker of the DataLoader's first worker


class ShardStream(torch.utils.data.IterableDataset):
    """Collated micro-batches, each with ``worker`` (logical id) and ``position`` (after it)."""

    def __init__(self, urls: list[str], encode: Callable[[ShardSample, int | None], dict[str, Any]],
                 settings: StreamSettings, share_shards: bool = False):
        """``share_shards``: with fewer shards than workers, every worker reads them all and keeps its
        share of the samples (a small dataset in a mixture), instead of being refused."""
        super().__init__()
        s = settings
        if s.conversation not in CONVERSATIONS:
            raise DataConfigError(f"data.conversation must be one of {CONVERSATIONS}, got {s.conversation!r}")
        if s.on_bad_sample not in ("error", "skip"):
            raise DataConfigError(f"data.on_bad_sample must be 'error' or 'skip', got {s.on_bad_sample!r}")
        workers = max(1, s.num_workers)
        self.shared = share_shards and len(urls) < s.world_size * workers
        if len(urls) < s.world_size * workers and not self.shared:
            raise DataConfigError(
                f"{len(urls)} shards for {s.world_size} ranks x {workers} loader workers: every worker needs at "
                "least one shard. Use fewer data.num_workers, or write smaller shards (llark shards --shard-samples)"
            )
        self.urls, self.encode, self.s = list(urls), encode, s
        self._told_too_long = False
        self.questions = compile_question_filter(s.questions)

    def _units(self, epoch: int, group: int, shard_ids: list[int], worker: int,
               stride: tuple[int, int] | None = None) -> Iterator[tuple[ShardSample, int | None]]:
        """One group's examples, in its shuffled order (a pure function of its arguments and the seed).
        With ``stride = (g, G)`` every worker reads the same shards in the same interleaved order and
        keeps the samples ``g, g + G, ...`` of it (a stream with fewer shards than workers)."""
        rng = np.random.default_rng([self.s.seed, epoch, worker, group, 1])
        interleave = rng if stride is None else np.random.default_rng([self.s.seed, epoch, group, 2])
        streams = [iter_shard(self.urls[i]) for i in shard_ids]
        buffer: list[tuple[ShardSample, int | None]] = []
        read = 0

        def pop():
            i = int(rng.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            return buffer.pop()

        while streams:
            j = int(interleave.integers(len(streams)))
            try:
                raw = next(streams[j])
            except StopIteration:
                streams.pop(j)
                continue
            read += 1
            if stride is not None and (read - 1) % stride[1] != stride[0]:
                continue
            try:
                sample = read_sample(raw)
            except BadSample as exc:
                if self.s.on_bad_sample == "error":
                    raise
                log.warning("skipping a bad sample (data.on_bad_sample=skip): %s", exc)
                continue
            if self.questions is not None:
                sample.pairs = [p for p in sample.pairs if self.questions.search(p[0])]
                if not sample.pairs:
                    continue
            if self.s.conversation == "pair":
                buffer.extend((sample, k) for k in range(len(sample.pairs)))
            else:
                buffer.append((sample, None))
            while len(buffer) > self.s.buffer_size:
                yield pop()
        while buffer:
            yield pop()

    def worker_examples(self, worker: int, start: dict[str, int] | None = None) -> Iterator[tuple[str, Any, Position]]:
        """Logical worker ``worker``'s examples in order, each as ``("example", example, position after it)``;
        a sample left out is ``("skipped" | "too_long", None, position)``."""
        s = self.s
        workers = max(1, s.num_workers)
        g, G = s.rank * workers + worker, s.world_size * workers
        pos = Position(**(start or {}))
        stride = (g, G) if self.shared else None
        while s.epochs is None or pos.epoch < s.epochs:
            shard_ids = worker_shards(len(self.urls), pos.epoch, s.seed, 0 if stride else g, 1 if stride else G)
            groups = [shard_ids[i:i + s.group_shards] for i in range(0, len(shard_ids), s.group_shards)]
            while pos.group < len(groups):
                for n, (sample, pair) in enumerate(self._units(pos.epoch, pos.group, groups[pos.group], g, stride)):
                    if n < pos.offset:
                        continue
                    pos.offset = n + 1
                    try:
                        example = self.encode(sample, pair)
                    except SampleTooLong as exc:
                        if s.on_too_long == "error":
                            raise
                        if not self._told_too_long:
                            log.warning("skipping samples longer than data.max_seq_len (data.on_too_long=skip; the "
                                        "count is in the metrics as too_long_samples), the first: %s", exc)
                            self._told_too_long = True
                        yield "too_long", None, pos
                        continue
                    except BadSample as exc:
                        if s.on_bad_sample == "error":
                            raise
                        log.warning("skipping a bad sample (data.on_bad_sample=skip): %s", exc)
                        yield "skipped", None, pos
                        continue
                    yield "example", example, pos
                pos = Position(pos.epoch, pos.group + 1, 0)
            pos = Position(pos.epoch + 1, 0, 0)

    def worker_stream(self, worker: int) -> Iterator[dict[str, Any]]:
        """The batches of logical worker ``worker`` (``rank * num_workers + worker`` globally)."""
        s = self.s
        batch, left_out = [], Counter()
        pos = Position(**s.start.get(worker, {}))
        for kind, example, pos in self.worker_examples(worker, s.start.get(worker)):
            if kind != "example":
                left_out[kind] += 1
                continue
            batch.append(example)
            if len(batch) == s.micro_batch:
                yield collate_batch(batch, s, worker, pos.to_dict(), left_out)
                batch, left_out = [], Counter()
        if batch:
            yield collate_batch(batch, s, worker, pos.to_dict(), left_out)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        physical, n = (0, 1) if info is None else (info.id, info.num_workers)
        if n != max(1, self.s.num_workers):
            raise DataConfigError(f"the DataLoader has {n} workers, the stream was set up for {self.s.num_workers}")
        if info is not None:
            torch.set_num_threads(1)
        yield from self.worker_stream((physical + self.s.rotation) % n)


def collate_batch(examples: list[dict[str, Any]], s: StreamSettings, worker: int, position: dict[str, Any],
           left_out: Counter, **more: Any) -> dict[str, Any]:
    out = collate(examples, s.pad_id, s.pad_to_multiple_of)
    out.update(worker=worker, position=position, skipped=left_out["skipped"], too_long=left_out["too_long"], **more)
    return out


class LoaderState:
    """The data position of one rank: the position of each logical worker and the rotation."""

    def __init__(self, num_workers: int, rotation: int = 0, positions: dict[int, dict[str, int]] | None = None):
        self.num_workers = max(1, num_workers)
        self.rotation = rotation
        self.positions = dict(positions or {})
        self.batches = 0

    def update(self, batch: dict[str, Any]) -> None:
        self.positions[int(batch["worker"])] = dict(batch["position"])
        self.batches += 1

    def to_dict(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "rotation": (self.rotation + self.batches) % self.num_workers,
                "positions": {str(k): v for k, v in sorted(self.positions.items())}}

    @classmethod
    def from_dict(cls, data: dict[str, Any], num_workers: int) -> "LoaderState":
        if data["num_workers"] != max(1, num_workers):
            raise DataConfigError(f"the checkpoint's data position is for {data['num_workers']} loader workers per "
                                  f"rank; resume with data.num_workers={data['num_workers']}")
        return cls(num_workers, data["rotation"], {int(k): v for k, v in data["positions"].items()})


def make_loader(stream: ShardStream) -> torch.utils.data.DataLoader:
    workers = stream.s.num_workers
    # Starting an iterator draws a seed; from the global generator that draw would shift the dropout masks
    # of a resumed run (whose RNG state was restored before the loader starts) against an uninterrupted one.
    # The stream shuffles with its own seeded generators; this seed only seeds the workers' torch RNGs.
    own_generator = torch.Generator().manual_seed(stream.s.seed * 1_000_003 + stream.s.rank)
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if workers else None, persistent_workers=False,
        multiprocessing_context="fork" if workers and os.name == "posix" else None, generator=own_generator,
    )
