"""The ``clap`` encoder on tiny random ``ClapModel`` checkpoints saved as LAION's are published,
checked against transformers' own ``ClapModel.audio_model`` forward pass on the same audio: frames,
their count and order, windows, batching, determinism, refusals and the description."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.encoders import clap  # noqa: E402
from pipeline.runner import StageConfigError  # noqa: E402

SR = clap.SAMPLE_RATE
WINDOW = 10 * SR
DIM = 128  # TINY: 16 channels doubled over 4 stages
STEPS = 32  # time steps per 10 s window: 3.2 Hz


@pytest.fixture(scope="module")
def unfused(tmp_path_factory):
    return clap.write_random_checkpoint(tmp_path_factory.mktemp("clap") / "clap-htsat-unfused-tiny")


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    # laion/clap-htsat-fused is published as pytorch_model.bin
    return clap.write_random_checkpoint(tmp_path_factory.mktemp("clap") / "clap-htsat-fused-tiny", seed=1,
                                        fusion=True, safetensors=False)


@pytest.fixture(scope="module")
def native(unfused):
    return encoder(unfused, frame_rate="native")


def encoder(directory, **options):
    return clap.build(clap.check_options({"weights_dir": str(directory), **options}))


def noise(seconds: float, seed: int = 0, sr: int = SR) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(round(seconds * sr)))).astype(np.float32)


@functools.lru_cache(maxsize=None)
def library(directory):
    from transformers import ClapFeatureExtractor, ClapModel

    return ClapModel.from_pretrained(str(directory)).eval(), ClapFeatureExtractor.from_pretrained(str(directory))


def library_forward(directory, audio: np.ndarray):
    """transformers' ClapModel's audio tower on one 10 s input as its extractor prepares it:
    (last_hidden_state averaged over its frequency bins as [time, dim], pooler_output)."""
    assert len(audio) == WINDOW
    model, extractor = library(directory)
    inputs = extractor(audio, sampling_rate=SR, return_tensors="pt")
    # The extractor marks a lone clip "longer" at random (a batch with none longer gets one); this one is not.
    is_longer = torch.zeros_like(inputs["is_longer"])
    with torch.no_grad():
        out = model.audio_model(input_features=inputs["input_features"], is_longer=is_longer,
                                output_hidden_states=True)
    assert out.last_hidden_state.shape == (1, DIM, 2, STEPS)
    return out.last_hidden_state.mean(dim=2)[0].T.numpy(), out.pooler_output[0].numpy()


def padded(audio: np.ndarray) -> np.ndarray:
    return np.pad(audio, (0, WINDOW - len(audio)))


@pytest.mark.parametrize("which", ["unfused", "fused"])
def test_a_10_s_clip_matches_the_library_forward(which, request):
    directory = request.getfixturevalue(which)
    audio = noise(10.0, seed=3)
    out = encoder(directory).encode(audio, SR)
    expected, pooled = library_forward(directory, audio)
    assert out.shape == expected.shape == (STEPS, DIM)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    # CLAP's pooled embedding (before its projection) is the mean of a full window's frames.
    np.testing.assert_allclose(out.mean(axis=0), pooled, rtol=1e-4, atol=1e-5)


def test_features_are_deterministic_and_leave_the_random_state_alone(fused):
    _, extractor = library(fused)
    windows = np.stack([noise(10.0, seed=4), noise(10.0, seed=5)])
    # The library marks one of two 10 s windows "longer" at random: the encoder never passes that on.
    assert np.asarray(extractor([w for w in windows], sampling_rate=SR)["is_longer"]).sum() == 1
    before = np.random.get_state()
    first = clap.extract_features(extractor, windows)
    after = np.random.get_state()
    assert np.array_equal(after[1], before[1]) and after[2:] == before[2:]
    second = clap.extract_features(extractor, windows)
    assert first.shape == (2, 4, 1001, 64) and np.array_equal(first, second)
    assert np.array_equal(first[:, 0], first[:, 3])  # four copies of the one view
    enc = encoder(fused)
    audio = noise(3.0, seed=6)
    assert np.array_equal(enc.encode(audio, SR), enc.encode(audio, SR))


def centre_s(j: int) -> float:
    """The middle of time step ``j``: resized mel frames 32j .. 32j + 31 of 1024 spread over 1001 (10 ms each)."""
    return (32 * j + 15.5) * 1000 / 1023 / 100


def test_frames_are_in_chronological_order(tmp_path):
    """With every attention output zeroed, a frame sees only its own patch of the spectrogram, so a
    click changes the frame of its time and no other."""
    from safetensors.torch import load_file, save_file

    directory = clap.write_random_checkpoint(tmp_path / "no-attention")
    state = load_file(str(directory / "model.safetensors"))
    for key in state:
        if key.startswith("audio_model.") and ".attention.output.dense." in key:
            state[key] = torch.zeros_like(state[key])
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    background = noise(10.0, seed=8)
    clips = [background]
    for j in (3, 13, 25):
        clicked = background.copy()
        at = int(centre_s(j) * SR)
        clicked[at : at + 96] += 1.0
        clips.append(clicked)
    arrays = encoder(directory, batch_windows=4).encode_batch([(c, SR) for c in clips])
    for j, array in zip((3, 13, 25), arrays[1:], strict=True):
        changed = np.flatnonzero(np.abs(array - arrays[0]).max(axis=1) > 1e-4)
        assert changed.tolist() == [j]


def test_frame_counts_and_windows(unfused, native):
    assert native.encode(noise(0.5), SR).shape == (2, DIM)  # ceil(0.5 / 0.3125)
    assert native.encode(noise(0.01), SR).shape == (1, DIM)
    assert native.encode(noise(10.0), SR).shape == (STEPS, DIM)
    assert native.encode(noise(10.0 + 0.3125), SR).shape == (STEPS + 1, DIM)
    assert native.encode(np.concatenate([noise(10.0), [0.05]]).astype(np.float32), SR).shape == (STEPS + 1, DIM)
    audio = noise(25.0, seed=9)
    out = native.encode(audio, SR)
    assert out.shape == (80, DIM)  # 32 + 32 + 16
    np.testing.assert_allclose(out[32:64], library_forward(unfused, audio[10 * SR : 20 * SR])[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[64:], library_forward(unfused, padded(audio[20 * SR :]))[0][:16], rtol=1e-4,
                               atol=1e-5)
    pooled = encoder(unfused, frame_rate=1).encode(audio, SR)
    assert pooled.shape == (25, DIM)
    starts = np.arange(80) * 0.3125
    for k in (0, 9, 10, 24):
        held = (starts >= k) & (starts < k + 1)
        np.testing.assert_allclose(pooled[k], out[held].mean(axis=0), rtol=1e-5, atol=1e-6)


def test_other_sample_rates_are_resampled(native):
    import soxr

    audio = noise(2.0, seed=10, sr=44_100)
    out = native.encode(audio, 44_100)
    assert out.shape == (7, DIM)  # ceil(2 / 0.3125)
    at_48k = soxr.resample(audio, 44_100, SR, quality="HQ").astype(np.float32)
    np.testing.assert_allclose(out, native.encode(at_48k, SR), rtol=1e-5, atol=1e-6)


def test_batches_give_the_same_arrays(unfused):
    clips = [(noise(s, seed=20 + i), SR) for i, s in enumerate((12.0, 3.0, 21.0))]
    one = encoder(unfused, batch_windows=1)
    many = encoder(unfused, batch_windows=4)
    alone = [one.encode(a, sr) for a, sr in clips]
    together = many.encode_batch(clips)
    again = many.encode_batch(clips)
    for a, b, c in zip(alone, together, again, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert np.array_equal(b, c)


def test_computed_buffers_and_the_text_tower_are_not_needed(unfused, tmp_path):
    """A checkpoint without the attention index tables and BatchNorm counters (computed, not learned)
    or without the text tower loads to the same frames."""
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "audio-only"
    shutil.copytree(unfused, directory)
    state = load_file(str(directory / "model.safetensors"))
    dropped = [k for k in state if k.endswith(clap.DERIVED) or not k.startswith("audio_model.")]
    assert any(k.endswith("relative_position_index") for k in dropped)
    assert any(k.endswith("num_batches_tracked") for k in dropped)
    save_file({k: v for k, v in state.items() if k not in dropped}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    audio = noise(1.0, seed=11)
    np.testing.assert_array_equal(encoder(directory).encode(audio, SR), encoder(unfused).encode(audio, SR))


def test_missing_or_unusable_checkpoints_are_refused(unfused, tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(StageConfigError, match="--weights-dir: the clap encoder needs a CLAP checkpoint .*not exist"):
        clap.check_options({"weights_dir": str(tmp_path / "nowhere")})
    with pytest.raises(StageConfigError, match="--weights-dir"):
        clap.check_options({})
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(unfused / "config.json", bare / "config.json")
    with pytest.raises(StageConfigError, match="--weights-dir: .*lacks some of them"):
        clap.check_options({"weights_dir": str(bare)})
    shutil.copy(unfused / "model.safetensors", bare / "model.safetensors")
    with pytest.raises(StageConfigError, match="--weights-dir: .*lacks some of them"):  # no preprocessor_config.json
        clap.check_options({"weights_dir": str(bare)})

    other = tmp_path / "other"
    shutil.copytree(unfused, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "whisper"}))
    with pytest.raises(StageConfigError, match="config.json has model_type 'whisper', not a CLAP checkpoint"):
        clap.check_options({"weights_dir": str(other)})
    (other / "config.json").write_text(json.dumps(config))
    extractor = json.loads((other / "preprocessor_config.json").read_text())
    (other / "preprocessor_config.json").write_text(json.dumps({**extractor, "truncation": "fusion"}))
    with pytest.raises(StageConfigError, match="truncation 'fusion' but .*enable_fusion false"):
        clap.check_options({"weights_dir": str(other)})

    for layers in ("2", "all", "mean", "1-3"):
        with pytest.raises(StageConfigError, match=re.escape(f"--layers {layers}: the clap encoder has one hidden "
                                                             "state") + ".*other widths and resolutions"):
            clap.check_options({"weights_dir": str(unfused), "layers": layers})
    with pytest.raises(StageConfigError, match=r"--frame-rate 10: .* at most the encoder's own 3.2 Hz"):
        clap.check_options({"weights_dir": str(unfused), "frame_rate": 10})
    with pytest.raises(StageConfigError, match="--window-seconds: not an option of the clap encoder"):
        clap.check_options({"weights_dir": str(unfused), "window_seconds": 5})

    partial = tmp_path / "partial"
    shutil.copytree(unfused, partial)
    state = load_file(str(partial / "model.safetensors"))
    del state["audio_model.audio_encoder.layers.2.blocks.0.output.dense.weight"]
    save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(StageConfigError, match="missing audio_encoder.layers.2.blocks.0.output.dense.weight"):
        encoder(partial)


def test_the_description_names_the_checkpoint(unfused, fused, tmp_path):
    options = clap.check_options({"weights_dir": str(unfused)})
    assert options["layers"] == 0 and options["frame_rate"] == "native"
    assert clap.check_options(options) == options  # checked options pass again (workers)
    description = clap.describe(options)
    assert (description["name"], description["layer"], description["frame_rate_hz"], description["dim"]) == \
        ("clap", 0, 3.2, DIM)
    config = description["config"]
    assert config["model"] == "clap htsat depths [1,1,1,1] x 128"
    assert (config["hidden_states"], config["window_s"], config["native_frame_rate_hz"], config["fusion"]) == \
        (1, 10.0, 3.2, False)
    assert re.fullmatch(r"[0-9a-f]{64}", config["checkpoint"]["sha256"])
    assert clap.describe({**options, "layers": "last", "frame_rate": 1.0})["frame_rate_hz"] == 1.0
    enc = encoder(unfused, layers="0")
    assert (enc.dim, enc.frame_rate_hz, enc.layer, enc.config()) == (DIM, 3.2, 0, config)
    fused_config = clap.describe(clap.check_options({"weights_dir": str(fused)}))["config"]
    assert fused_config["fusion"] is True and fused_config["checkpoint"]["sha256"] != config["checkpoint"]["sha256"]
    other = clap.write_random_checkpoint(tmp_path / "other", num_attention_heads=[2, 2, 4, 8])
    changed = clap.describe(clap.check_options({"weights_dir": str(other)}))
    assert changed["config"]["checkpoint"]["sha256"] != config["checkpoint"]["sha256"]
