"""Connectors: encoder frames ``[batch, frames, dim]`` → audio tokens ``[batch, tokens, hidden]``.

Each is one file with the same interface (:class:`Connector`): ``in_features`` and
``out_features``; ``tokens_for(frames)``, the number of audio tokens a clip of ``frames`` frames
becomes, known before the forward pass so that the prompt's placeholders can be laid out;
``forward(audio, audio_frames)`` on right-padded frames, returning right-padded tokens; and
``input_layer``, the linear layer that reads the frames (``projector_init: standardise`` sets it
from the training frames' statistics).

==============  ===============================================================================
``linear``      the paper's projector: one token per frame, ``W x + b`` (the default; its
                weights keep the file layout of every earlier export)
``mlp``         Linear-GELU-Linear (LLaVA-1.5, Audio Flamingo 3), one token per frame
``qformer``     window-level Q-Former (SALMONN): each window of ``window`` frames gives
                ``queries`` learned queries that cross-attend to the window's frames through
                ``layers`` blocks; ``ceil(frames / window) × queries`` tokens
``attention_    several encoders at their own frame rates: each span of ``span_s`` seconds
fusion``        gives ``queries`` learned queries that cross-attend to every encoder's frames
                in the span; ``ceil(duration / span_s) × queries`` tokens. Its ``audio`` and
                ``audio_frames`` are dicts by encoder name, and ``tokens_for`` takes
                ``{encoder: frames}``
==============  ===============================================================================

In front of any of them, embeddings that keep every hidden state of the encoder (``--layers all``)
get a learned softmax-weighted sum over the states (:mod:`llark.model.connectors.layer_mix`).

The settings are a dict (``model.connector`` in the training config, ``connector`` in
``llark_config.json``); :func:`check_connector` fills in the defaults and refuses a bad one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llark.model.connectors.attention_fusion import AttentionFusionConnector
from llark.model.connectors.layer_mix import LayerMix
from llark.model.connectors.linear import LinearConnector
from llark.model.connectors.mlp import MlpConnector
from llark.model.connectors.qformer import QFormerConnector

CONNECTORS = {"linear": LinearConnector, "mlp": MlpConnector, "qformer": QFormerConnector,
              "attention_fusion": AttentionFusionConnector}
Connector = LinearConnector | MlpConnector | QFormerConnector | AttentionFusionConnector
# Connectors that read several encoders (audio and audio_frames as {encoder: tensor}).
MULTI_ENCODER = ("attention_fusion",)


class ConnectorConfigError(ValueError):
    """A connector setting that cannot work; the message names the field."""


def check_connector(settings: dict[str, Any] | None) -> dict[str, Any]:
    """The settings with their defaults; raises ConnectorConfigError naming ``model.connector.<field>``."""
    settings = dict(settings or {"name": "linear"})
    name = settings.pop("name", "linear")
    if name not in CONNECTORS:
        raise ConnectorConfigError(f"model.connector.name: {name!r} is not a connector (choose from "
                                   f"{', '.join(CONNECTORS)})")
    cls = CONNECTORS[name]
    unknown = sorted(set(settings) - set(cls.DEFAULTS))
    if unknown:
        raise ConnectorConfigError(f"model.connector.{unknown[0]}: not a setting of the {name} connector "
                                   f"(it takes {', '.join(sorted(cls.DEFAULTS)) or 'none'})")
    full = {**cls.DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
    for key in getattr(cls, "INTEGER_SETTINGS", full):
        value = full[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConnectorConfigError(f"model.connector.{key}: a positive integer, got {value!r}")
    try:
        cls.check(full)
    except ValueError as exc:
        raise ConnectorConfigError(str(exc)) from None
    return {"name": name, **full}


def build_connector(settings: dict[str, Any], in_features: int, out_features: int, dtype: torch.dtype,
                    device: torch.device | str | None = None, states: int | None = None) -> nn.Module:
    """The connector; with ``states`` (frames that keep that many hidden states), its ``layer_mix``
    submodule mixes them first."""
    checked = check_connector(settings)
    name = checked.pop("name")
    connector = CONNECTORS[name](in_features, out_features, dtype=dtype, device=device, **checked)
    if states is not None:
        connector.layer_mix = LayerMix(states, dtype=dtype, device=device)
    return connector


def mix_layers(connector: nn.Module, audio: torch.Tensor) -> torch.Tensor:
    """``[batch, frames, dim]`` frames for the connector: stored states mixed by its ``layer_mix``."""
    mix = getattr(connector, "layer_mix", None)
    if mix is None:
        if isinstance(audio, dict):  # attention_fusion: {encoder: [batch, frames, dim]}
            return audio
        if audio.ndim != 3:
            raise ValueError(f"audio of shape {tuple(audio.shape)}; this connector takes [batch, frames, dim]")
        return audio
    return mix(audio)


def audio_tokens(settings: dict[str, Any] | None, frames: int) -> int:
    """Audio tokens of a clip of ``frames`` (pooled) frames, without building the connector."""
    checked = check_connector(settings)
    return CONNECTORS[checked.pop("name")].count_tokens(frames, **checked)


def audio_to(audio: torch.Tensor | dict[str, torch.Tensor], *args, **kwargs):
    """``audio.to(...)``, for one tensor or a dict of them by encoder."""
    if isinstance(audio, dict):
        return {name: a.to(*args, **kwargs) for name, a in audio.items()}
    return audio.to(*args, **kwargs)
