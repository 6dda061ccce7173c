"""The ``mert`` encoder on tiny random checkpoints in MERT's published layout, checked against
transformers' own ``HubertModel`` forward pass on the same audio; and the shared pieces of the
Hugging Face encoders (layers, windows, pooling) on known inputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.encoders import build_encoder, check_encoder_options, describe_encoder, mert  # noqa: E402
from pipeline.encoders.pretrained import (  # noqa: E402
    LayerChoice,
    parse_frame_rate,
    parse_layers,
    plan_windows,
    pool_frames,
)
from pipeline.runner import StageConfigError  # noqa: E402

SR = mert.SAMPLE_RATE


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return mert.write_random_checkpoint(tmp_path_factory.mktemp("mert") / "MERT-v1-tiny")


def encoder(directory, **options):
    return build_encoder("mert", check_encoder_options("mert", {"weights_dir": str(directory), **options}))


def library_states(directory, audio: np.ndarray) -> np.ndarray:
    """transformers' HubertModel with the same random weights (rebuilt from the seed that wrote them)
    on the window normalised as Wav2Vec2FeatureExtractor does: [states, frames, dim]."""
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    fields = {k: v for k, v in json.loads((directory / "config.json").read_text()).items() if k in mert.HUBERT_FIELDS}
    torch.manual_seed(0)
    model = HubertModel(HubertConfig(**{**mert.TINY, **fields})).eval()
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(directory))
    values = extractor(audio, sampling_rate=SR, return_tensors="pt")["input_values"]
    with torch.no_grad():
        return torch.stack(model(values, output_hidden_states=True).hidden_states, 1)[0].numpy()


def noise(seconds: float, seed: int = 0, sr: int = SR) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(round(seconds * sr)))).astype(np.float32)


def test_every_hidden_state_matches_the_library_forward(checkpoint):
    audio = noise(3.0)
    out = encoder(checkpoint, layers="all", frame_rate="native").encode(audio, SR)
    expected = library_states(checkpoint, audio)
    assert out.shape == expected.shape == (mert.TINY["num_hidden_layers"] + 1, mert.frames_of(len(audio), [10, 3, 3, 3, 3, 2, 2], [5, 2, 2, 2, 2, 2, 2]), 32)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_the_330m_layout_with_pre_layer_norm_and_safetensors_loads(tmp_path):
    directory = mert.write_random_checkpoint(tmp_path / "MERT-v1-330M-tiny", safetensors=True,
                                             do_stable_layer_norm=True, feat_extract_norm="layer", conv_bias=True)
    audio = noise(2.0, seed=1)
    out = encoder(directory, layers="all", frame_rate="native").encode(audio, SR)
    np.testing.assert_allclose(out, library_states(directory, audio), rtol=1e-5, atol=1e-5)


def test_windows_are_stitched_in_order(checkpoint):
    audio = noise(12.0, seed=2)  # windows of 5 s, 5 s and 2 s
    out = encoder(checkpoint, layers="all", frame_rate="native").encode(audio, SR)
    counts = [mert.frames_of(n, [10, 3, 3, 3, 3, 2, 2], [5, 2, 2, 2, 2, 2, 2]) for n in (5 * SR, 5 * SR, 2 * SR)]
    assert out.shape[1] == sum(counts) == 374 + 374 + 149
    last = library_states(checkpoint, audio[10 * SR:])
    np.testing.assert_allclose(out[:, -counts[2]:], last, rtol=1e-5, atol=1e-5)
    first = library_states(checkpoint, audio[: 5 * SR])
    np.testing.assert_allclose(out[:, : counts[0]], first, rtol=1e-5, atol=1e-5)


def test_layers_and_pooling_from_the_encoder(checkpoint):
    audio = noise(2.5, seed=3)
    every = encoder(checkpoint, layers="all", frame_rate="native").encode(audio, SR)
    np.testing.assert_allclose(encoder(checkpoint, layers="1", frame_rate="native").encode(audio, SR), every[1],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(encoder(checkpoint, layers="0-2", frame_rate="native").encode(audio, SR),
                               every.mean(axis=0), rtol=1e-5, atol=1e-6)
    pooled = encoder(checkpoint, layers="2").encode(audio, SR)  # 10 Hz by default
    assert pooled.shape == (25, 32)
    starts = np.arange(every.shape[1]) / 75.0
    for k in (0, 7, 24):
        held = (starts >= k / 10 - 1e-9) & (starts < (k + 1) / 10 - 1e-9)
        np.testing.assert_allclose(pooled[k], every[2][held].mean(axis=0), rtol=1e-5, atol=1e-6)


def test_short_clips_and_other_sample_rates(checkpoint):
    enc = encoder(checkpoint, layers="last")
    assert enc.encode(noise(0.5), SR).shape == (5, 32)
    assert enc.encode(noise(0.01), SR).shape == (1, 32)  # shorter than the receptive field: padded to it
    assert enc.encode(noise(2.0, sr=44_100), 44_100).shape == (20, 32)


def test_batches_give_the_same_arrays(checkpoint):
    clips = [(noise(s, seed=i), SR) for i, s in enumerate((6.0, 2.0, 5.0, 6.0))]
    one = encoder(checkpoint, layers="mean", batch_windows=1)
    many = encoder(checkpoint, layers="mean", batch_windows=4)
    alone = [one.encode(a, sr) for a, sr in clips]
    together = many.encode_batch(clips)
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_missing_or_unusable_checkpoints_are_refused(checkpoint, tmp_path):
    with pytest.raises(StageConfigError, match="--weights-dir: the mert encoder needs MERT-v1.*config.json"):
        check_encoder_options("mert", {"weights_dir": str(tmp_path / "nowhere")})
    with pytest.raises(StageConfigError, match="--weights-dir"):
        check_encoder_options("mert", {})
    for field, value in (("feature_extractor_cqt", True), ("deepnorm", True)):
        bad = mert.write_random_checkpoint(tmp_path / field)
        config = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(StageConfigError, match=f"sets {field}: true; .*does not implement {field}"):
            check_encoder_options("mert", {"weights_dir": str(bad)})
    partial = mert.write_random_checkpoint(tmp_path / "partial")
    state = torch.load(partial / "pytorch_model.bin", weights_only=True)
    del state["encoder.layers.1.feed_forward.output_dense.weight"]
    torch.save(state, partial / "pytorch_model.bin")
    with pytest.raises(StageConfigError, match="missing encoder.layers.1.feed_forward.output_dense.weight"):
        encoder(partial)
    with pytest.raises(StageConfigError, match="--layers 3: this checkpoint has hidden states 0-2"):
        check_encoder_options("mert", {"weights_dir": str(checkpoint), "layers": "3"})
    with pytest.raises(StageConfigError, match="--frame-rate 100: .* at most the encoder's own 75 Hz"):
        check_encoder_options("mert", {"weights_dir": str(checkpoint), "frame_rate": 100})
    with pytest.raises(StageConfigError, match="--window-seconds: not an option of the whisper"):
        check_encoder_options("whisper", {"weights_dir": str(checkpoint), "window_seconds": 5})


def test_the_description_names_the_checkpoint(checkpoint, tmp_path):
    options = check_encoder_options("mert", {"weights_dir": str(checkpoint), "layers": "1-2"})
    description = describe_encoder("mert", options)
    assert (description["name"], description["layer"], description["frame_rate_hz"], description["dim"]) == \
        ("mert", "1-2", 10.0, 32)
    assert description["config"]["hidden_states"] == 3 and description["config"]["native_frame_rate_hz"] == 75.0
    other = mert.write_random_checkpoint(tmp_path / "other", num_attention_heads=4)
    changed = describe_encoder("mert", check_encoder_options("mert", {"weights_dir": str(other), "layers": "1-2"}))
    assert changed["config"]["checkpoint"]["sha256"] != description["config"]["checkpoint"]["sha256"]


# ---------------------------------------------------------------------------------------------
# The shared pieces on known inputs


def test_layer_specifications():
    assert parse_layers("6", 13) == LayerChoice(6, 6)
    assert parse_layers("6-12", 13) == LayerChoice(6, 12)
    assert parse_layers("all", 25) == LayerChoice(0, 24, keep_all=True)
    assert parse_layers("mean", 13).manifest_value == "0-12"
    assert parse_layers("last", 13).manifest_value == 12
    for bad in ("13", "7-3", "six", "1,2"):
        with pytest.raises(StageConfigError, match="--layers"):
            parse_layers(bad, 13)
    states = np.arange(3 * 2 * 1, dtype=np.float32).reshape(3, 2, 1)
    np.testing.assert_array_equal(LayerChoice(1, 2).apply(states), states[1:].mean(axis=0))
    assert LayerChoice(0, 2, keep_all=True).apply(states) is states


def test_frame_rates_and_pooling_on_known_frames():
    assert parse_frame_rate(None, 75.0) == 10.0 and parse_frame_rate(None, 3.2) is None
    assert parse_frame_rate("native", 50.0) is None and parse_frame_rate(50, 50.0) is None
    frames = np.arange(12, dtype=np.float32).reshape(12, 1)  # 12 frames at 4 Hz
    pooled = pool_frames(frames, np.arange(12) / 4.0, 2.0)  # pairs
    np.testing.assert_array_equal(pooled[:, 0], [0.5, 2.5, 4.5, 6.5, 8.5, 10.5])
    stacked = np.stack([frames, 10 * frames])  # [states, frames, dim]: time is the middle axis
    np.testing.assert_array_equal(pool_frames(stacked, np.arange(12) / 4.0, 1.0)[1, :, 0], [15, 55, 95])
    assert plan_windows(11, 5) == [(0, 5), (5, 5), (10, 1)] and plan_windows(10, 5) == [(0, 5), (5, 5)]
