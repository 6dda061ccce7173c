"""Training on shards of several encoders (``llark shards --embeddings A --embeddings B``).

:func:`select_encoders` decides, before any weight loads, which of the shards' encoders the
connector reads (``model.connector.encoders``): ``attention_fusion`` reads the ones named (default:
every encoder the shards carry), any other connector reads one, the one named or the only one; a
name the shards lack, or several encoders for a one-encoder connector, is refused naming
``model.connector.encoders`` and ``data.shards``. Shards of one encoder are an encoder of that
name (member ``npy``), so ``attention_fusion`` also trains on them.

The result, :class:`EncoderSelection`, makes the pieces that differ: the connector's settings
(each encoder's dim and frame rate), the identity kept in ``llark_config.json`` (``encoder``, a
list for ``attention_fusion``), the examples (``audio`` a dict of ``[frames, dim]`` arrays by
encoder), and each encoder's frame statistics for ``projector_init: standardise``.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from llark.data import (BadSample, DataConfigError, ExampleEncoder, ShardSample, collate, decode_audio, iter_shard,
                        read_sample)
from llark.model.connectors import MULTI_ENCODER

log = logging.getLogger("llark")

def shard_encoders(manifest: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """``{name: (member extension, manifest)}`` of what a shards directory's ``encoder.json`` holds."""
    from pipeline.shard_encoders import is_multi

    if is_multi(manifest):
        return {name: (f"{name}.npy", m) for name, m in manifest["encoders"].items()}
    return {manifest["name"]: ("npy", manifest)}


def identity(manifest: dict[str, Any]) -> dict[str, Any]:
    from pipeline.encoders import IDENTITY_FIELDS

    return {k: manifest[k] for k in IDENTITY_FIELDS}


@dataclass
class EncoderSelection:
    connector: str
    members: dict[str, str]  # encoder name -> the sample member holding its array
    manifests: dict[str, dict[str, Any]]

    @property
    def fusion(self) -> bool:
        return self.connector in MULTI_ENCODER

    @property
    def manifest(self) -> dict[str, Any]:
        """The one encoder's manifest (a one-encoder connector), else the first's."""
        return next(iter(self.manifests.values()))

    @property
    def dims(self) -> dict[str, int]:
        return {name: int(m["dim"]) for name, m in self.manifests.items()}

    def describe(self) -> str:
        return "; ".join(f"{name}: {m['name']}, dim {m['dim']}, {m['frame_rate_hz']} Hz" for name, m in self.manifests.items())

    def connector_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        """``settings`` completed with what the shards say (the encoders' names, dims and rates)."""
        if not self.fusion:
            return settings
        inputs = {name: {"dim": int(m["dim"]), "frame_rate_hz": float(m["frame_rate_hz"])}
                  for name, m in self.manifests.items()}
        return {**settings, "encoders": list(self.manifests), "inputs": inputs}

    @property
    def reads_members(self) -> bool:
        """Arrays other than a single-encoder sample's ``npy``."""
        return self.fusion or list(self.members.values()) != ["npy"]

    def encoder_identity(self) -> dict[str, Any] | list[dict[str, Any]]:
        if not self.fusion:
            name, member = next(iter(self.members.items()))
            return identity(self.manifest) | ({"key": name} if member != "npy" else {})
        return [{"key": name, **identity(m)} for name, m in self.manifests.items()]

    def examples(self, base: ExampleEncoder) -> ExampleEncoder:
        """The example encoder reading this selection's member(s) of each sample."""
        if self.fusion:
            return FusionExamples(base, self.members, self.dims)
        member = next(iter(self.members.values()))
        return base if member == "npy" else SelectedExamples(base, member)

    def statistics(self, urls: list[str], frame_pool: int, max_samples: int):
        """Per encoder ``(mean, std)`` of the frames, over the first ``max_samples`` samples of ``urls``."""
        return member_statistics(urls, self.members, self.dims, frame_pool, max_samples)


def select_encoders(manifest: dict[str, Any], connector: str, wanted: list[str] | None, where: str = "data.shards",
                    ) -> EncoderSelection:
    """The encoders ``connector`` reads from shards of ``manifest``; refused naming the fields (see module doc)."""
    available = shard_encoders(manifest)
    carried = ", ".join(available)
    for name in wanted or []:
        if name not in available:
            raise DataConfigError(f"model.connector.encoders: {name!r} is not in {where}, which carries {carried}")
    if connector in MULTI_ENCODER:
        names = list(wanted or available)
    elif wanted:
        if len(wanted) != 1:
            raise DataConfigError(f"model.connector.encoders: the {connector} connector reads one encoder, got {wanted}; "
                                  "model.connector.name: attention_fusion reads several")
        names = list(wanted)
    elif len(available) > 1:
        raise DataConfigError(f"{where}: the shards carry several encoders ({carried}) and the {connector} connector "
                              "reads one: name it in model.connector.encoders (e.g. [" + next(iter(available)) + "]), "
                              "or read them all with model.connector.name: attention_fusion")
    else:
        names = list(available)
    for name in names:
        if available[name][1].get("layer") == "all" and (connector in MULTI_ENCODER or len(available) > 1):
            raise DataConfigError(f"{where}: encoder {name!r} holds every hidden state per clip ([states, frames, "
                                  "dim], layer 'all'); their learned mix works on shards of that encoder alone: "
                                  "embed with --layers L or A-B for shards of several encoders")
    return EncoderSelection(connector, {n: available[n][0] for n in names}, {n: available[n][1] for n in names})


def select_for_run(cfg: Any, shards: Any, validation_shards: Any = None, trained: Any = None) -> EncoderSelection:
    """The encoders a training run's connector reads, checked before any weight loads; the shard
    sets' ``manifest`` becomes the (first) selected encoder's. ``trained``: model.init_from's
    LlarkConfig, whose connector and encoders a continued run keeps."""
    from llark.errors import LlarkConfigError

    m = cfg.model
    name, wanted = m.connector.name, m.connector.encoders
    if trained is not None:
        if "connector" not in m.model_fields_set:
            name = trained.connector["name"]
        encoder = trained.encoder
        wanted = wanted or (trained.connector.get("encoders") if name in MULTI_ENCODER else
                            [encoder["key"]] if isinstance(encoder, dict) and encoder.get("key") else None)
    if name in MULTI_ENCODER:
        if (m.frame_pool or 1) > 1:
            raise LlarkConfigError(f"model.frame_pool: the {name} connector reads the frames at their own rates; "
                                   "leave model.frame_pool unset (its spans, model.connector.span_s, set the tokens)")
        if cfg.validation.every and cfg.validation.tasks:
            raise LlarkConfigError(f"validation.tasks: answering questions during training reads one encoder's "
                                   f"embeddings (validation.embeddings); the {name} connector reads several. Keep "
                                   "validation.every for the loss, or run `llark ask` on the exported model")
    selection = select_encoders(shards.manifest, name, wanted)
    shards.manifest = selection.manifest
    if validation_shards is not None:
        from pipeline.encoders import describe_differences, manifest_differences

        other = select_encoders(validation_shards.manifest, name, list(selection.members), "validation.shards")
        for encoder, found in other.manifests.items():
            if differences := manifest_differences(selection.manifests[encoder], found):
                raise DataConfigError(f"validation.shards hold {encoder} embeddings of another encoder than "
                                      "data.shards: " + describe_differences(differences))
        validation_shards.manifest = other.manifest
    if trained is not None and selection.fusion:
        check_trained_encoders(selection, trained.encoder)
    return selection


def check_trained_encoders(selection: EncoderSelection, trained: Any) -> None:
    """Refuse shards whose encoders differ from those model.init_from's connector was trained on."""
    from pipeline.encoders import FRAME_FIELDS, describe_differences, manifest_differences

    entries = trained if isinstance(trained, list) else [{"key": None, **trained}] if trained else []
    for entry in entries:
        name = entry.get("key") or next(iter(selection.manifests))
        found = selection.manifests.get(name)
        if found is None:
            raise DataConfigError(f"data.shards: no encoder {name!r}, which model.init_from's connector reads")
        if differences := manifest_differences(entry, found, FRAME_FIELDS):
            raise DataConfigError(f"encoder mismatch: model.init_from's connector was trained on other {name} frames "
                                  "than the shards hold: " + describe_differences(differences))


class SelectedExamples(ExampleEncoder):
    """An example encoder reading one encoder's member (``<name>.npy``) of shards of several."""

    def __init__(self, base: ExampleEncoder, member: str):
        self.__dict__.update(base.__dict__)
        self.member = member

    def decode(self, sample: ShardSample) -> np.ndarray:
        return super().decode(pick(sample, self.member))


class FusionExamples(ExampleEncoder):
    """``audio`` as ``{encoder: [frames, dim]}``, the token count from every encoder's frames."""

    def __init__(self, base: ExampleEncoder, members: dict[str, str], dims: dict[str, int]):
        self.__dict__.update(base.__dict__)
        self.members, self.dims = dict(members), dict(dims)

    def decode(self, sample: ShardSample) -> dict[str, np.ndarray]:
        return {name: decode_audio(pick(sample, member), self.dims[name]) for name, member in self.members.items()}

    def frames_of(self, audio: dict[str, np.ndarray]) -> dict[str, int]:
        return {name: int(a.shape[0]) for name, a in audio.items()}


def pick(sample: ShardSample, member: str) -> ShardSample:
    """The sample with ``npy`` and ``frames`` those of its ``member`` array."""
    data = sample.arrays.get(member)
    if data is None:
        raise BadSample(f"sample {sample.key}: no {member} member (it has {sorted(sample.arrays)})")
    frames = sample.frames if member == "npy" else sample.frames_by.get(member)
    return replace(sample, npy=data, frames=frames)


def collate_encoders(examples: list[dict[str, Any]], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """:func:`llark.data.collate` for examples whose ``audio`` is ``{encoder: [frames, dim]}``: each
    encoder right-padded on its own, ``audio`` and ``audio_frames`` dicts by encoder."""
    names = list(examples[0]["audio"])
    out = collate([{**e, "audio": e["audio"][names[0]]} for e in examples], pad_id, pad_to_multiple_of)
    audio, frames = {}, {}
    for name in names:
        arrays = [e["audio"][name] for e in examples]
        padded = np.zeros((len(arrays), max(1, max(a.shape[0] for a in arrays)), arrays[0].shape[1]), arrays[0].dtype)
        for i, a in enumerate(arrays):
            padded[i, : a.shape[0]] = a
        audio[name] = torch.from_numpy(padded)
        frames[name] = torch.tensor([a.shape[0] for a in arrays], dtype=torch.int64)
    out.update(audio=audio, audio_frames=frames)
    return out


def to_device(value: Any, device, non_blocking: bool = True) -> Any:
    """A tensor, or a dict of tensors by encoder, on ``device``."""
    if isinstance(value, dict):
        return {k: v.to(device, non_blocking=non_blocking) for k, v in value.items()}
    return value.to(device, non_blocking=non_blocking)


def member_statistics(urls: list[str], members: dict[str, str], dims: dict[str, int], frame_pool: int = 1,
                      max_samples: int = 512) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """Each encoder's per-dimension mean and std over the first ``max_samples`` readable samples of
    ``urls`` in order (the same on every rank): ``({name: mean}, {name: std}, samples read)``."""
    from llark.model.llark import pool_frames

    total = {n: np.zeros(d, np.float64) for n, d in dims.items()}
    squares = {n: np.zeros(d, np.float64) for n, d in dims.items()}
    tokens, samples = dict.fromkeys(dims, 0), 0
    for raw in itertools.chain.from_iterable(iter_shard(url) for url in urls):
        try:
            sample = read_sample(raw)
            arrays = {n: pool_frames(decode_audio(pick(sample, m), dims[n]), frame_pool).astype(np.float64)
                      for n, m in members.items()}
        except BadSample as exc:
            log.warning("frame statistics: skipping %s", exc)
            continue
        for n, a in arrays.items():
            total[n] += a.sum(axis=0)
            squares[n] += np.square(a).sum(axis=0)
            tokens[n] += a.shape[0]
        samples += 1
        if samples >= max_samples:
            break
    if not samples:
        raise DataConfigError(f"no readable sample in {len(urls)} shards to compute the frames' statistics from")
    mean = {n: total[n] / tokens[n] for n in dims}
    std = {n: np.sqrt(np.maximum(squares[n] / tokens[n] - np.square(mean[n]), 0.0)).astype(np.float32) for n in dims}
    return {n: m.astype(np.float32) for n, m in mean.items()}, std, samples
