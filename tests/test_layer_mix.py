"""The learned mix of stored hidden states (``--layers all``) in front of every connector: it starts as
the mean of the states, its weights are trained with the connector, the loader and ``ask`` hand it
``[frames, states, dim]``, and a wrong state count is refused. Mert embeddings of every layer
through shards, training, export and ``llark ask``: tests/test_embed_pretrained.py."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from deepspeed.accelerator import get_accelerator  # noqa: E402

get_accelerator()  # its first call prints to stdout; keep that out of `llark ask --json`

from llark.data import BadSample, ShardSample, collate, decode_audio  # noqa: E402
from llark.model.connectors import build_connector, mix_layers  # noqa: E402
from llark.model.connectors.layer_mix import LayerMix  # noqa: E402
from test_connectors import SETTINGS  # noqa: E402

STATES, DIM, HIDDEN = 3, 8, 12


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_a_new_mix_is_the_mean_of_the_states_and_learns_to_pick_one():
    mix = LayerMix(STATES)
    audio = torch.randn(2, 5, STATES, DIM)
    torch.testing.assert_close(mix(audio), audio.mean(dim=2))
    # A target that is the last state alone: the weights move towards it.
    optimizer = torch.optim.Adam(mix.parameters(), lr=0.1)
    for _ in range(50):
        loss = (mix(audio) - audio[:, :, -1]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    weights = mix.weights().detach()
    assert weights[-1] > 0.8 and abs(float(weights.sum()) - 1) < 1e-6
    with pytest.raises(ValueError, match=r"\[batch, frames, 3, dim\]"):
        mix(torch.randn(2, 5, DIM))
    with pytest.raises(ValueError, match="at least 2"):
        LayerMix(1)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_every_connector_takes_stored_states_through_its_mix(name):
    torch.manual_seed(0)
    connector = build_connector(SETTINGS[name], DIM, HIDDEN, dtype=torch.float32, states=STATES)
    assert connector.state_dict()["layer_mix.logits"].shape == (STATES,)
    audio, frames = torch.randn(2, 6, STATES, DIM), torch.tensor([6, 4])
    tokens = connector(mix_layers(connector, audio), frames)
    expected = connector(audio.mean(dim=2), frames)
    torch.testing.assert_close(tokens, expected)  # a new mix is the mean
    tokens.square().sum().backward()
    assert connector.layer_mix.logits.grad is not None and connector.layer_mix.logits.grad.abs().sum() > 0
    plain = build_connector(SETTINGS[name], DIM, HIDDEN, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"takes \[batch, frames, dim\]"):
        mix_layers(plain, audio)


def test_the_loader_reads_stored_states_frames_first():
    stored = np.random.default_rng(0).standard_normal((STATES, 7, DIM)).astype(np.float16)
    sample = ShardSample(key="k", pairs=[("q", "a")], npy=npy(stored), frames=7)
    audio = decode_audio(sample, DIM, STATES)
    assert audio.shape == (7, STATES, DIM)
    np.testing.assert_array_equal(audio[:, 1], stored[1])
    with pytest.raises(BadSample, match=r"expected \[4, frames, 8\]"):
        decode_audio(sample, DIM, 4)
    with pytest.raises(BadSample, match=r"expected \[frames, 8\]"):
        decode_audio(sample, DIM)
    with pytest.raises(BadSample, match="7 frames, its json says 6"):
        decode_audio(ShardSample(key="k", pairs=[("q", "a")], npy=npy(stored), frames=6), DIM, STATES)
    short = np.ones((3, STATES, DIM), dtype=np.float16)
    batch = collate([{"key": "a", "input_ids": [1, 2], "labels": [1, 2], "audio": audio},
                     {"key": "b", "input_ids": [1], "labels": [1], "audio": short}], pad_id=0)
    assert batch["audio"].shape == (2, 7, STATES, DIM) and batch["audio_frames"].tolist() == [7, 3]
    assert torch.equal(batch["audio"][1, 3:], torch.zeros(4, STATES, DIM, dtype=torch.float16))


def test_frame_statistics_are_those_of_the_mean_of_the_states(tmp_path):
    import webdataset as wds

    from llark.data import frame_statistics

    rng = np.random.default_rng(1)
    scales = np.array([1.0, 5.0, 9.0])[:, None, None]
    arrays = [(rng.standard_normal((STATES, n, DIM)) * scales).astype(np.float32) for n in (4, 6)]
    url = str(tmp_path / "s.tar")
    with wds.TarWriter(url) as sink:
        for k, array in enumerate(arrays):
            meta = {"pairs": [{"question": "q", "answer": "a"}], "encoding": {"frames": array.shape[1]}}
            sink.write({"__key__": f"k{k}", "json": json.dumps(meta).encode(), "npy": npy(array)})
    mean, std, samples = frame_statistics([url], DIM, states=STATES)
    mixed = np.concatenate([a.mean(axis=0) for a in arrays])
    assert samples == 2
    np.testing.assert_allclose(mean, mixed.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, mixed.std(axis=0), rtol=1e-4, atol=1e-6)


def test_ask_takes_stored_states_and_refuses_another_count(tmp_path):
    from llark.inference import InferenceError, read_frames

    stored = np.random.default_rng(2).standard_normal((STATES, 5, DIM)).astype(np.float32)
    np.save(tmp_path / "all.npy", stored, allow_pickle=False)
    frames = read_frames(tmp_path / "all.npy", DIM, STATES)
    assert frames.shape == (5, STATES, DIM)
    np.testing.assert_array_equal(frames[:, 2], stored[2])
    with pytest.raises(InferenceError, match=r"expected finite \[2, frames, 8\]"):
        read_frames(tmp_path / "all.npy", DIM, 2)
    with pytest.raises(InferenceError, match=r"expected finite \[frames, 8\]"):
        read_frames(tmp_path / "all.npy", DIM)


def test_every_state_is_mixed_on_shards_of_one_encoder_only():
    from llark.data import DataConfigError
    from llark.multi_encoder import select_encoders

    def manifest(name, layer):
        return {"name": name, "layer": layer, "frame_rate_hz": 10.0, "dim": DIM, "dtype": "float16",
                "config": {"hidden_states": STATES} if layer == "all" else {}}

    alone = manifest("mert", "all")
    assert list(select_encoders(alone, "linear", None).members) == ["mert"]
    with pytest.raises(DataConfigError, match="learned mix works on shards of that encoder alone"):
        select_encoders(alone, "attention_fusion", None)
    several = {"encoders": {"mert": alone, "features": manifest("features", None)}}
    with pytest.raises(DataConfigError, match=r"encoder 'mert' holds every hidden state"):
        select_encoders(several, "linear", ["mert"])
