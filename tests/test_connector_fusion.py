"""The attention_fusion connector and shards of several encoders: token counts from the clip's duration
for clips of several lengths and two encoders at different frame rates, padding that never leaks into
a clip's tokens, gradients to every part, a learnable toy task, missing encoders refused naming the
field, two encoders' shards written, validated and read back; and (slow) embed with two encoders →
shards → train, killed and resumed to the uninterrupted run's losses → export → ``llark ask`` on an audio file."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from deepspeed.accelerator import get_accelerator  # noqa: E402

get_accelerator()  # its one stdout line stays out of `llark ask --json`

import llark.cli  # noqa: E402
from llark.data import DataConfigError  # noqa: E402
from llark.model.connectors import ConnectorConfigError, audio_tokens, build_connector, check_connector  # noqa: E402
from llark.multi_encoder import select_encoders  # noqa: E402
from pipeline.records import read_jsonl  # noqa: E402
from test_embed_pretrained import embed, run  # noqa: E402,F401 (run is a fixture)

HIDDEN = 12
INPUTS = {"features": {"dim": 8, "frame_rate_hz": 10.0}, "slow": {"dim": 6, "frame_rate_hz": 3.2}}
SETTINGS = {"name": "attention_fusion", "inputs": INPUTS, "span_s": 0.5, "queries": 2, "layers": 1, "heads": 2,
            "width": 16}


def fusion(settings=SETTINGS, seed=0):
    torch.manual_seed(seed)
    return build_connector(settings, None, HIDDEN, dtype=torch.float32)


def batch(durations, inputs=INPUTS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    frames = {name: torch.tensor([math.ceil(d * spec["frame_rate_hz"]) for d in durations]) for name, spec in inputs.items()}
    audio = {name: torch.randn(len(durations), int(frames[name].max()), spec["dim"], generator=generator)
             for name, spec in inputs.items()}
    return audio, frames


def test_token_counts_follow_the_duration_for_two_encoders_at_different_rates():
    model = fusion().eval()
    durations = [0.3, 1.0, 2.05, 3.1]
    audio, frames = batch(durations)
    tokens = model(audio, frames)
    per_clip = [{name: int(frames[name][i]) for name in INPUTS} for i in range(len(durations))]
    expected = [audio_tokens(SETTINGS, f) for f in per_clip]
    # The longer of the two durations counts: 0.3 s is 3 frames at 10 Hz and 1 at 3.2 Hz (0.31 s): 1 span;
    # 1.0 s is 10 and 4 frames (1.25 s): 3 spans; 3.1 s is 31 and 10 frames (3.125 s): 7 spans.
    assert expected == [2, 6, 10, 14]
    assert model.token_counts(frames).tolist() == expected == [model.tokens_for(f) for f in per_clip]
    assert tokens.shape == (len(durations), max(expected), HIDDEN)
    for row, f in enumerate(per_clip):
        alone = {name: audio[name][row : row + 1, : f[name]] for name in INPUTS}
        counts = {name: frames[name][row : row + 1] for name in INPUTS}
        single = model(alone, counts)[0]
        torch.testing.assert_close(tokens[row, : expected[row]], single, rtol=1e-5, atol=1e-5)
        noisy = {name: audio[name][row : row + 1].clone() for name in INPUTS}
        for name in INPUTS:
            noisy[name][:, f[name]:] = 1e3
        torch.testing.assert_close(model(noisy, counts)[0, : expected[row]], single, rtol=1e-5, atol=1e-5)


def test_each_span_reads_the_frames_overlapping_it_from_every_encoder():
    model = fusion().eval()
    audio, frames = batch([2.0])
    reference = model(audio, frames)
    # Changing the slow encoder's frame 2 ([0.625, 0.9375) s) changes span 1 ([0.5, 1.0) s) only.
    changed = {name: a.clone() for name, a in audio.items()}
    changed["slow"][0, 2] += 5.0
    moved = (model(changed, frames) - reference).abs().sum(-1)[0].reshape(-1, 2).sum(-1)
    assert moved[1] > 1e-3 and torch.all(moved[[0, 2, 3]] < 1e-6), moved


def test_gradients_reach_every_part_and_a_toy_task_is_learned():
    inputs = {"features": {"dim": 8, "frame_rate_hz": 10.0}, "other": {"dim": 6, "frame_rate_hz": 4.0}}
    settings = {**SETTINGS, "inputs": inputs, "queries": 1}
    model = fusion(settings)
    audio, frames = batch([2.0] * 8, inputs, seed=1)
    generator = torch.Generator().manual_seed(2)
    map_a, map_b = torch.randn(8, HIDDEN, generator=generator), torch.randn(6, HIDDEN, generator=generator)
    # Each span's token should say the mean of the first encoder's frames in it plus the second's (2 per span).
    target = audio["features"].reshape(8, 4, 5, 8).mean(2) @ map_a + audio["other"].reshape(8, 4, 2, 6).mean(2) @ map_b
    from fixtures_train import fit_connector

    assert {n.split(".")[1] for n, _ in model.named_parameters() if n.startswith("input_proj.")} == set(inputs)
    losses = fit_connector(model, audio, frames, target, steps=150)
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


def test_standardised_initialisation_puts_tokens_at_the_embeddings_spread():
    model = fusion().eval()
    rng = np.random.default_rng(0)
    audio, frames = batch([2.0] * 32)
    scaled, mean, std = {}, {}, {}
    for name, a in audio.items():
        values = a.numpy() * rng.uniform(0.1, 50.0, a.shape[-1]) + 7.0
        scaled[name] = torch.tensor(values, dtype=torch.float32)
        mean[name], std[name] = values.reshape(-1, a.shape[-1]).mean(0), values.reshape(-1, a.shape[-1]).std(0)
    model.initialise(mean, std, token_std=0.05)
    with torch.no_grad():
        tokens = model(scaled, frames)
    assert 0.02 < float(tokens.std()) < 0.12, float(tokens.std())
    with pytest.raises(ValueError, match="no frame statistics of encoder 'slow'"):
        model.initialise({"features": mean["features"]}, {"features": std["features"]}, token_std=0.05)


def test_settings_and_missing_encoders_are_refused_naming_the_field():
    from llark.train import TrainConfigError, load_config

    assert check_connector({"name": "attention_fusion"})["span_s"] == 0.5
    for bad, field in (({"span_s": 0}, "model.connector.span_s"), ({"encoders": ["a", "a"]}, "model.connector.encoders"),
                       ({"width": 10, "heads": 4}, "model.connector.width"), ({"queries": 0}, "model.connector.queries"),
                       ({"inputs": {"a": {"dim": 0, "frame_rate_hz": 10}}}, "model.connector.inputs.a")):
        with pytest.raises(ConnectorConfigError, match=field):
            check_connector({"name": "attention_fusion", **bad})
    with pytest.raises(TrainConfigError, match="model.connector.encoders: the linear connector reads one encoder"):
        load_config(None, {"model.connector.encoders": ["features", "mert"]})
    audio, frames = batch([1.0])
    with pytest.raises(ValueError, match="no frames of encoder 'slow'"):
        fusion()({"features": audio["features"]}, {"features": frames["features"]})
    with pytest.raises(ValueError, match="no frames of encoder 'slow'"):
        audio_tokens(SETTINGS, {"features": 10})
    manifest = {"encoders": {"features": {"name": "features", "layer": None, "frame_rate_hz": 10.0, "dim": 128},
                             "mert": {"name": "mert", "layer": 3, "frame_rate_hz": 25.0, "dim": 32}}}
    assert list(select_encoders(manifest, "attention_fusion", None).members) == ["features", "mert"]
    assert select_encoders(manifest, "linear", ["mert"]).members == {"mert": "mert.npy"}
    with pytest.raises(DataConfigError, match="model.connector.encoders: 'clap' is not in data.shards, which carries "
                                              "features, mert"):
        select_encoders(manifest, "attention_fusion", ["features", "clap"])
    with pytest.raises(DataConfigError, match=r"data.shards: the shards carry several encoders .* model.connector.encoders"):
        select_encoders(manifest, "qformer", None)
    one = {"name": "features", "layer": None, "frame_rate_hz": 10.0, "dim": 128}
    assert select_encoders(one, "attention_fusion", None).members == {"features": "npy"}


def write_shards(run, out, *embeddings):
    args = ["shards", "--clips", str(run / "clips.jsonl"), "--instructions", str(run / "instructions.jsonl"),
            "--out", str(out), "--no-progress"]
    for directory in embeddings:
        args += ["--embeddings", str(directory)]
    return llark.cli.main(args)


@pytest.fixture(scope="module")
def two(run):
    """The clips embedded with features (10 Hz) and the MERT stand-in at 25 Hz, and their shards."""
    assert llark.cli.main(["embed", str(run / "clips.jsonl"), "--embeddings-dir", str(run / "emb-features"),
                           "--no-progress"]) == 0
    assert embed(run, "mert", run / "emb-mert", "--frame-rate", "25") == 0
    assert write_shards(run, run / "shards2", run / "emb-features", run / "emb-mert") == 0
    return run


def test_shards_of_two_encoders_are_written_validated_and_read_back(two, tmp_path, capsys):
    from llark.data import ExampleEncoder, iter_shard, read_sample
    from llark.model import ChatFormatter, load_tokenizer
    from fixtures_train import tiny_lm_dir
    from pipeline.encoders import read_manifest
    from pipeline.shard_reader import iter_members

    shards = two / "shards2"
    manifest = json.loads((shards / "encoder.json").read_text())
    assert manifest["encoders"] == {"features": read_manifest(two / "emb-features"),
                                    "mert": read_manifest(two / "emb-mert")}
    index = json.loads((shards / "index.json").read_text())
    assert set(index["encoders"]) == {"features", "mert"} and "encoder" not in index
    assert llark.cli.main(["validate-shards", str(shards)]) == 0
    tar = shards / next(s["file"] for s in index["shards"] if s["split"] == "train")
    assert tar.name.endswith("-features_mert-000000.tar")
    with open(tar, "rb") as fh:
        names = [m.name for m in iter_members(fh, tar.name)]
    assert names[:3] == [f"{names[0].split('.')[0]}.{ext}" for ext in ("features.npy", "mert.npy", "json")]

    embedded = {name: {r["id"]: np.load(r["embedding_path"]) for r in read_jsonl(two / f"emb-{name}" / "embeddings.jsonl")}
                for name in ("features", "mert")}
    selection = select_encoders(manifest, "attention_fusion", None)
    encode = selection.examples(ExampleEncoder(ChatFormatter(load_tokenizer(tiny_lm_dir())), 0, 512,
                                               audio_tokens=lambda f: audio_tokens(selection.connector_settings(
                                                   {"name": "attention_fusion"}), f)))
    seen = 0
    for raw in iter_shard(str(tar)):
        sample = read_sample(raw)
        example = encode(sample, 0)
        clip = sample.key.rsplit("-", 1)[0]
        for name in ("features", "mert"):
            np.testing.assert_array_equal(example["audio"][name], embedded[name][clip])
        seconds = embedded["features"][clip].shape[0] / 10
        assert embedded["mert"][clip].shape[0] == math.ceil(seconds * 25 - 1e-9)
        longer = max(seconds, embedded["mert"][clip].shape[0] / 25)  # the tokens follow the longer encoder
        assert sum(np.asarray(example["input_ids"]) == encode.formatter.audio_token_id) == math.ceil(longer / 0.5 - 1e-6)
        seen += 1
    assert seen == 4

    # A damaged array is found and named by its encoder; one encoder twice needs names.
    capsys.readouterr()
    assert write_shards(two, tmp_path / "same", two / "emb-mert", two / "emb-mert") == 2
    assert "are both named 'mert'; name them apart as NAME=DIR" in capsys.readouterr().err
    assert write_shards(two, tmp_path / "named", f"m1={two / 'emb-mert'}", f"m2={two / 'emb-mert'}") == 0
    assert list(json.loads((tmp_path / "named" / "encoder.json").read_text())["encoders"]) == ["m1", "m2"]
    record = read_jsonl(two / "emb-mert" / "embeddings.jsonl")[0]
    bad = tmp_path / "emb-bad"
    bad.mkdir()
    for name in ("encoder.json", "embeddings.jsonl"):
        (bad / name).write_text((two / "emb-mert" / name).read_text().replace(str(two / "emb-mert"), str(bad)))
    for r in read_jsonl(two / "emb-mert" / "embeddings.jsonl"):
        target = bad / os.path.relpath(r["embedding_path"], two / "emb-mert")
        target.parent.mkdir(parents=True, exist_ok=True)
        array = np.load(r["embedding_path"])
        np.save(target, array[:, :16] if r["id"] == record["id"] else array, allow_pickle=False)
    assert write_shards(two, tmp_path / "bad", two / "emb-features", bad) == 0
    missing = read_jsonl(tmp_path / "bad" / "missing.jsonl")
    assert [(m["clip_id"], m["reason"]) for m in missing] == [(record["id"], "bad_embedding")]
    assert "mert: " in missing[0]["detail"]


def test_training_refuses_a_missing_encoder_before_any_weight_loads(two, tmp_path):
    from llark.train import TrainRecipe, load_config

    base = {"data.shards": [str(two / "shards2")], "output_dir": str(tmp_path / "out"), "global_batch": 1,
            "micro_batch": 1, "model.lm_path": "/nonexistent"}
    for overrides, message in (
            ({"model.connector.name": "attention_fusion", "model.connector.encoders": ["features", "clap"]},
             "model.connector.encoders: 'clap' is not in data.shards, which carries features, mert"),
            ({"model.connector.name": "mlp"}, "data.shards: the shards carry several encoders")):
        with pytest.raises(DataConfigError, match=message):
            TrainRecipe(load_config(None, {**base, **overrides}))


@pytest.mark.slow
def test_embed_two_encoders_shards_train_resume_export_and_ask(two, tmp_path, capsys):
    import sys

    from test_ask import run_ask
    from test_train import kill_when_logged, losses, run_train, train_args

    settings = {"model.connector.name": "attention_fusion", "model.connector.layers": 1, "model.connector.heads": 2,
                "model.mode": "projector", "optim.max_steps": 4, "save_every": 1, "data.num_workers": 1,
                "global_batch": 2, "micro_batch": 1, "export": False}
    straight = tmp_path / "straight"
    run_train(straight, two / "shards2", **settings)
    out = tmp_path / "train"
    kill_when_logged([sys.executable, "-m", "llark.train"] + train_args(out, two / "shards2", **settings),
                     out / "metrics.jsonl", 2)
    result = run_train(out, two / "shards2", **{**settings, "export": True})
    assert "resuming at step" in result.stdout, result.stdout[-2000:]
    assert sorted(losses(out)) == [1, 2, 3, 4] and losses(out) == losses(straight)
    config = json.loads((out / "final" / "llark_config.json").read_text())
    assert config["connector"]["encoders"] == ["features", "mert"]
    assert [(e["key"], e["frame_rate_hz"]) for e in config["encoder"]] == [("features", 10.0), ("mert", 25.0)]
    wav = two / "wav" / "c1.wav"
    ask = [str(out / "final"), str(wav), "What is the key of this song?", "--json", "--max-new-tokens", "3",
           "--encoder-option", f"mert.weights_dir={two / 'standins' / 'mert'}"]
    capsys.readouterr()
    # Each encoder is built with the frame rate it was trained at; another one named is refused.
    code, _, stderr = run_ask(ask + ["--encoder-option", "mert.frame_rate=10"], capsys)
    assert code == 2 and "encoder 'mert': the encoder differs" in stderr and "frame_rate_hz: 25.0 != 10.0" in stderr
    code, stdout, _ = run_ask(ask, capsys)
    assert code == 0, stdout
    answer = json.loads(stdout)
    assert isinstance(answer["answer"], str) and answer["frames"] == {"features": 35, "mert": 88}

    # llark evaluate reads each encoder's embeddings of the clips, by the names the model was trained with.
    clips = tmp_path / "labelled.jsonl"
    clips.write_text("".join(json.dumps({**r, "labels": {"key": "C major"}}) + "\n"
                             for r in read_jsonl(two / "clips.jsonl")))
    evaluate = ["evaluate", str(out / "final"), "--clips", str(clips), "--tasks", "key", "--split", "valid",
                "--max-new-tokens", "key=3", "--out", str(tmp_path / "eval")]
    assert llark.cli.main(evaluate + ["--embeddings", str(two / "emb-features")]) == 2
    assert "give --embeddings features=DIR --embeddings mert=DIR" in capsys.readouterr().err
    assert llark.cli.main(evaluate + ["--embeddings", f"features={two / 'emb-features'}"]) == 2
    assert "no mert=DIR, and the model reads encoder 'mert'" in capsys.readouterr().err
    assert llark.cli.main(evaluate + ["--embeddings", f"features={two / 'emb-features'}",
                                      "--embeddings", f"mert={two / 'emb-mert'}"]) == 0
    predictions = read_jsonl(tmp_path / "eval" / "predictions.jsonl")
    assert len(predictions) == 2 and set(predictions[0]["embedding_path"]) == {"features", "mert"}
