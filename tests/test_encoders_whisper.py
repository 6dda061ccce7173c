"""The ``whisper`` encoder on tiny random checkpoints saved as Hugging Face publishes Whisper, checked
against transformers' own ``WhisperModel`` forward pass on the checkpoint's log-mel features."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.encoders import build_encoder, check_encoder_options, describe_encoder, prepare_audio, whisper  # noqa: E402
from pipeline.runner import StageConfigError  # noqa: E402

SR = whisper.SAMPLE_RATE
WINDOW = 30 * SR
FRAME = 320  # samples per encoder frame at 16 kHz: hop 160 x conv stride 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return whisper.write_random_checkpoint(tmp_path_factory.mktemp("whisper") / "whisper-tiny-random")


@pytest.fixture(scope="module")
def library(checkpoint):
    """transformers' WhisperModel and WhisperFeatureExtractor loaded from the stand-in."""
    from transformers import WhisperFeatureExtractor, WhisperModel

    return WhisperModel.from_pretrained(str(checkpoint)).eval(), WhisperFeatureExtractor.from_pretrained(str(checkpoint))


def library_states(library, audio: np.ndarray) -> np.ndarray:
    """The library's encoder on one window of 16 kHz audio, the frames that start in it kept:
    [states, ceil(n / 320), dim]."""
    model, extractor = library
    features = extractor(audio, sampling_rate=SR, return_tensors="pt")["input_features"]
    with torch.no_grad():
        out = model.encoder(features, output_hidden_states=True)
    states = torch.stack(out.hidden_states, 1)[0].numpy()
    np.testing.assert_array_equal(states[-1], out.last_hidden_state[0].numpy())  # the final layer norm applied
    return states[:, : math.ceil(len(audio) / FRAME)]


def encoder(directory, **options):
    return build_encoder("whisper", check_encoder_options("whisper", {"weights_dir": str(directory), **options}))


@pytest.fixture(scope="module")
def every(checkpoint):
    """The stand-in with every hidden state kept at the encoder's own 50 Hz."""
    return encoder(checkpoint, layers="all", frame_rate="native")


def noise(seconds: float, seed: int = 0, sr: int = SR) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(round(seconds * sr)))).astype(np.float32)


def test_every_hidden_state_matches_the_library_forward(every, library):
    audio = noise(3.0)
    out = every.encode(audio, SR)
    expected = library_states(library, audio)
    assert out.shape == expected.shape == (whisper.TINY["encoder_layers"] + 1, 150, 32)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_the_whisper_model_layout_in_a_pytorch_bin_loads(checkpoint, every, tmp_path):
    """``WhisperModel`` checkpoints name the encoder ``encoder.*``; older ones ship ``pytorch_model.bin``."""
    from safetensors.torch import load_file

    other = tmp_path / "whisper-model-layout"
    other.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(checkpoint / name, other / name)
    state = {k.removeprefix("model."): v for k, v in load_file(str(checkpoint / "model.safetensors")).items()}
    assert any(k.startswith("decoder.") for k in state) and any(k.startswith("encoder.") for k in state)
    torch.save(state, other / "pytorch_model.bin")
    audio = noise(2.0, seed=1)
    np.testing.assert_array_equal(encoder(other, layers="all", frame_rate="native").encode(audio, SR),
                                  every.encode(audio, SR))


def test_other_sample_rates_are_resampled(checkpoint, every):
    audio = noise(2.0, seed=2, sr=44_100)
    native = every.encode(audio, 44_100)
    assert native.shape == (3, 100, 32)
    at_16k = prepare_audio(audio, 44_100, SR, peak_normalise=False)
    np.testing.assert_array_equal(native, every.encode(at_16k, SR))
    assert encoder(checkpoint).encode(audio, 44_100).shape == (20, 32)  # last layer at 10 Hz by default


def test_layers_and_pooling_from_the_encoder(checkpoint, every):
    audio = noise(2.5, seed=3)
    states = every.encode(audio, SR)
    np.testing.assert_allclose(encoder(checkpoint, layers="1", frame_rate="native").encode(audio, SR), states[1],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(encoder(checkpoint, layers="0-2", frame_rate="native").encode(audio, SR),
                               states.mean(axis=0), rtol=1e-5, atol=1e-6)
    default = encoder(checkpoint)  # the last state (the final encoder output) at 10 Hz
    assert (default.layer, default.frame_rate_hz, default.dim) == (2, 10.0, 32)
    pooled = default.encode(audio, SR)
    assert pooled.shape == (25, 32)
    np.testing.assert_allclose(pooled, states[2].reshape(25, 5, 32).mean(axis=1), rtol=1e-5, atol=1e-6)


def test_frame_counts_and_windows_stitched_in_order(every, library):
    for samples, frames in ((SR // 2, 25), (1, 1), (FRAME, 1), (FRAME + 1, 2), (WINDOW, 1500), (WINDOW + FRAME, 1501)):
        assert every.encode(noise(samples / SR, seed=samples), SR).shape == (3, frames, 32), samples
    audio = noise(65.0, seed=4)  # windows of 30 s, 30 s and 5 s
    out = every.encode(audio, SR)
    assert out.shape == (3, 1500 + 1500 + 250, 32)
    np.testing.assert_allclose(out[:, :1500], library_states(library, audio[:WINDOW]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, 1500:3000], library_states(library, audio[WINDOW : 2 * WINDOW]),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, 3000:], library_states(library, audio[2 * WINDOW :]), rtol=1e-5, atol=1e-5)


def test_batches_give_the_same_arrays(checkpoint):
    clips = [(noise(s, seed=i), SR) for i, s in enumerate((31.0, 2.0, 30.0, 31.0, 2.0))]
    one = encoder(checkpoint, layers="mean", frame_rate="native", batch_windows=1)
    many = encoder(checkpoint, layers="mean", frame_rate="native", batch_windows=4)
    alone = [one.encode(a, sr) for a, sr in clips]
    together = many.encode_batch(clips)
    assert [a.shape[0] for a in together] == [1550, 100, 1500, 1550, 100]
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_missing_or_unusable_checkpoints_are_refused(checkpoint, tmp_path):
    files = r"needs a Whisper checkpoint .*config.json, preprocessor_config.json and model.safetensors or pytorch_model.bin"
    with pytest.raises(StageConfigError, match=f"--weights-dir: the whisper encoder {files}.* does not exist"):
        check_encoder_options("whisper", {"weights_dir": str(tmp_path / "nowhere")})
    with pytest.raises(StageConfigError, match="--weights-dir"):
        check_encoder_options("whisper", {})
    unweighted = tmp_path / "no-weights"
    shutil.copytree(checkpoint, unweighted)
    (unweighted / "model.safetensors").unlink()
    with pytest.raises(StageConfigError, match=f"--weights-dir: the whisper encoder {files}.* lacks some of them"):
        check_encoder_options("whisper", {"weights_dir": str(unweighted)})
    unprocessed = tmp_path / "no-preprocessor"
    shutil.copytree(checkpoint, unprocessed)
    (unprocessed / "preprocessor_config.json").unlink()
    with pytest.raises(StageConfigError, match=f"--weights-dir: the whisper encoder {files}.* lacks some of them"):
        check_encoder_options("whisper", {"weights_dir": str(unprocessed)})

    bert = tmp_path / "bert"
    shutil.copytree(checkpoint, bert)
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(StageConfigError, match="config.json has model_type 'bert', not a Whisper checkpoint"):
        check_encoder_options("whisper", {"weights_dir": str(bert)})

    mels = tmp_path / "mels"
    shutil.copytree(checkpoint, mels)
    processor = json.loads((mels / "preprocessor_config.json").read_text())
    (mels / "preprocessor_config.json").write_text(json.dumps({**processor, "feature_size": 128}))
    with pytest.raises(StageConfigError, match="preprocessor_config.json has feature_size 128 .* num_mel_bins 80"):
        check_encoder_options("whisper", {"weights_dir": str(mels)})
    (mels / "preprocessor_config.json").write_text(json.dumps({**processor, "dither": 1e-5}))
    with pytest.raises(StageConfigError, match="preprocessor_config.json sets dither: 1e-05"):
        check_encoder_options("whisper", {"weights_dir": str(mels)})

    from safetensors.torch import load_file, save_file

    state = load_file(str(checkpoint / "model.safetensors"))
    partial = tmp_path / "partial"
    shutil.copytree(checkpoint, partial)
    save_file({k: v for k, v in state.items() if k != "model.encoder.layers.1.fc2.weight"},
              str(partial / "model.safetensors"))
    with pytest.raises(StageConfigError, match=r"--weights-dir .*partial: the weights do not match .*missing "
                                               r"layers\.1\.fc2\.weight"):
        encoder(partial)
    # The decoder is never read: a file holding only the encoder's tensors loads.
    encoder_only = tmp_path / "encoder-only"
    shutil.copytree(checkpoint, encoder_only)
    save_file({k: v for k, v in state.items() if k.startswith("model.encoder.")}, str(encoder_only / "model.safetensors"))
    assert encoder_only.is_dir() and encoder(encoder_only).encode(noise(1.0), SR).shape == (10, 32)

    with pytest.raises(StageConfigError, match="--window-seconds: not an option of the whisper encoder"):
        check_encoder_options("whisper", {"weights_dir": str(checkpoint), "window_seconds": 5})
    with pytest.raises(StageConfigError, match="--layers 3: this checkpoint has hidden states 0-2"):
        check_encoder_options("whisper", {"weights_dir": str(checkpoint), "layers": "3"})
    with pytest.raises(StageConfigError, match="--frame-rate 75: .* at most the encoder's own 50 Hz"):
        check_encoder_options("whisper", {"weights_dir": str(checkpoint), "frame_rate": 75})


def test_the_description_names_the_checkpoint(checkpoint, tmp_path):
    options = check_encoder_options("whisper", {"weights_dir": str(checkpoint)})
    assert options["layers"] == 2 and options["frame_rate"] == 10.0
    description = describe_encoder("whisper", options)
    assert (description["name"], description["layer"], description["frame_rate_hz"], description["dim"]) == \
        ("whisper", 2, 10.0, 32)
    config = description["config"]
    assert (config["model"], config["hidden_states"], config["window_s"], config["native_frame_rate_hz"],
            config["sample_rate"], config["n_mels"]) == ("whisper encoder 2 layers x 32", 3, 30.0, 50.0, SR, 80)
    assert "compute_dtype" not in config  # frames from bfloat16 on a GPU and float32 on CPU are the same frames
    other = tmp_path / "other"
    shutil.copytree(checkpoint, other)
    raw = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**raw, "max_target_positions": 16}))
    changed = describe_encoder("whisper", check_encoder_options("whisper", {"weights_dir": str(other)}))
    assert changed["config"]["checkpoint"]["sha256"] != config["checkpoint"]["sha256"]


def test_large_v3_has_128_mel_bins(tmp_path):
    from transformers import WhisperFeatureExtractor, WhisperModel

    directory = whisper.write_random_checkpoint(tmp_path / "whisper-large-v3-random", seed=1, num_mel_bins=128)
    options = check_encoder_options("whisper", {"weights_dir": str(directory), "layers": "all",
                                                "frame_rate": "native"})
    assert describe_encoder("whisper", options)["config"]["n_mels"] == 128
    audio = noise(1.5, seed=5)
    library = (WhisperModel.from_pretrained(str(directory)).eval(), WhisperFeatureExtractor.from_pretrained(str(directory)))
    np.testing.assert_allclose(build_encoder("whisper", options).encode(audio, SR), library_states(library, audio),
                               rtol=1e-5, atol=1e-5)
