"""Audio tokens pooled from encoder frames, the question filter, and the projector's own learning rate:
the same pooling in training and in inference, a filter that keeps only matching pairs, and a new
projector initialised from the frames' statistics."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fixtures_train import QUESTIONS, tiny_lm_dir, write_shards  # noqa: E402

from llark.data import DataConfigError, ExampleEncoder, ShardStream, StreamSettings, frame_statistics, open_shards  # noqa: E402
from llark.model import ChatFormatter, ModelConfigError, load_tokenizer  # noqa: E402
from llark.model.llark import pool_frames  # noqa: E402
from llark.train import TrainConfigError, load_config  # noqa: E402

DIM = 16


def test_pool_frames_averages_consecutive_groups_and_keeps_the_tail():
    frames = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)
    pooled = pool_frames(frames, 3)
    expected = np.array([frames[0:3].mean(0), frames[3:6].mean(0), frames[6:7].mean(0)])
    np.testing.assert_array_equal(pooled, expected)
    assert pool_frames(frames, 1) is frames
    assert pool_frames(frames, 50).shape == (1, 2)
    assert pool_frames(frames.astype(np.float16), 2).dtype == np.float16
    with pytest.raises(ModelConfigError, match="frame_pool"):
        pool_frames(frames, 0)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tiny_lm_dir())


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    return d, write_shards(d, n_samples=24, n_shards=2, dim=DIM, frames=(5, 11), pairs=(2, 4))


def all_examples(tokenizer, shard_dir, frame_pool=1, **settings):
    encode = ExampleEncoder(ChatFormatter(tokenizer), DIM, 512, frame_pool=frame_pool)
    stream = ShardStream(open_shards([str(shard_dir)]).urls, encode,
                         StreamSettings(micro_batch=1, pad_id=tokenizer.pad_token_id, epochs=1, **settings))
    return list(stream)


def test_example_has_one_placeholder_per_pooled_frame(tokenizer, shards):
    shard_dir, samples = shards
    audio_id = tokenizer.convert_tokens_to_ids(ChatFormatter(tokenizer).audio_token)
    batches = all_examples(tokenizer, shard_dir, frame_pool=4)
    assert batches
    for b in batches:
        source = samples[b["keys"][0]]["audio"]
        assert int(b["audio_frames"][0]) == math.ceil(source.shape[0] / 4)
        assert int((b["input_ids"][0] == audio_id).sum()) == math.ceil(source.shape[0] / 4)
        np.testing.assert_array_equal(b["audio"][0, : b["audio_frames"][0]].numpy(), pool_frames(source, 4))


def test_question_filter_keeps_only_matching_pairs(tokenizer, shards):
    shard_dir, samples = shards
    everything = all_examples(tokenizer, shard_dir)
    assert len(everything) == sum(len(s["pairs"]) for s in samples.values())
    keyed = all_examples(tokenizer, shard_dir, questions=r"\bKEY\b|tempo")
    wanted = sum(1 for s in samples.values() for p in s["pairs"]
                 if p["question"] in (QUESTIONS[0], QUESTIONS[1]))
    assert 0 < len(keyed) == wanted < len(everything)
    for b in keyed:
        text = tokenizer.decode(b["input_ids"][0])
        assert "key of this song" in text or "tempo of this song" in text
    multi = all_examples(tokenizer, shard_dir, questions="tempo", conversation="multi_turn")
    assert len(multi) == sum(1 for s in samples.values() if any(p["question"] == QUESTIONS[1] for p in s["pairs"]))


def test_bad_question_filter_is_refused_naming_the_field(tokenizer, shards):
    with pytest.raises(DataConfigError, match="data.questions"):
        all_examples(tokenizer, shards[0], questions="key(")
    with pytest.raises(TrainConfigError, match="data.questions"):
        load_config(None, {"data.questions": "key(", "data.shards": ["x"]})
    with pytest.raises(TrainConfigError, match="optim.projector_lr"):
        load_config(None, {"optim.projector_lr": 0})
    with pytest.raises(TrainConfigError, match="model.frame_pool"):
        load_config(None, {"model.frame_pool": 0})


def test_inference_pools_like_training(tmp_path):
    """A model with frame_pool 5 answers raw frames exactly as the same weights with frame_pool 1
    answer the frames pooled (after rounding through the training storage dtype)."""
    import torch

    from llark.inference import GenerationSettings, Llark
    from llark.model.llark import LlarkConfig, build_llark, export_pretrained, load_pretrained, projector_state
    from test_ask import FEATURES_DIM, features_identity

    torch.manual_seed(0)
    dirs = {}
    for pool in (1, 5):
        config = LlarkConfig(lm_path=str(tiny_lm_dir()), encoder_dim=FEATURES_DIM, encoder=features_identity(),
                             frame_pool=pool)
        torch.manual_seed(0)
        model, tok = build_llark(config, dtype="float32", attn_implementation="sdpa")
        dirs[pool] = export_pretrained(tmp_path / f"pool{pool}", model.lm, tok, config, projector_state(model))
    assert json.loads((dirs[5] / "llark_config.json").read_text())["frame_pool"] == 5
    frames = [np.random.default_rng(i).standard_normal((n, FEATURES_DIM)).astype(np.float32)
              for i, n in enumerate((23, 7, 31))]
    pooled = [pool_frames(f.astype(np.float16), 5) for f in frames]
    settings = GenerationSettings(max_new_tokens=6)
    models = {pool: Llark(*load_pretrained(d, dtype="float32")) for pool, d in dirs.items()}
    answers = {}
    for pool, inputs in ((5, frames), (1, pooled)):
        llark = models[pool]
        prompt = llark.prompt_ids("What is the key?", math.ceil(23 / 5))
        audio_id = llark.tokenizer.convert_tokens_to_ids(llark.config.audio_token)
        assert prompt.count(audio_id) == 5
        answers[pool] = llark.answer(["What is the key?"] * 3, inputs, settings)
    assert answers[5] == answers[1]


def test_frame_statistics_are_those_of_the_pooled_frames(shards):
    shard_dir, samples = shards
    urls = open_shards([str(shard_dir)]).urls
    mean, std, read = frame_statistics(urls, DIM, frame_pool=4, max_samples=1000)
    pooled = np.concatenate([pool_frames(s["audio"], 4).astype(np.float64) for s in samples.values()])
    assert read == len(samples)
    np.testing.assert_allclose(mean, pooled.mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(std, pooled.std(axis=0), rtol=1e-4, atol=1e-5)
    # A cap reads the first samples in shard order: every rank gets the same figures.
    assert frame_statistics(urls, DIM, 4, max_samples=5)[2] == 5
    np.testing.assert_array_equal(frame_statistics(urls, DIM, 4, 5)[0], frame_statistics(urls, DIM, 4, 5)[0])


def test_standardised_projector_centres_and_scales_unnormalised_frames():
    from llark.model.connectors.linear import LinearConnector
    from llark.model.llark import standardise_projector

    rng = np.random.default_rng(0)
    centre, spread = rng.uniform(-200, 200, DIM), rng.uniform(0.1, 80, DIM)
    frames = (centre + spread * rng.standard_normal((4000, DIM))).astype(np.float32)
    projector = LinearConnector(DIM, 32)
    default_out = projector(torch.from_numpy(frames)).detach().numpy()
    standardise_projector(projector, frames.mean(0), frames.std(0), token_std=0.05, seed=3)
    out = projector(torch.from_numpy(frames)).detach().numpy()
    assert np.abs(out.mean(axis=0)).max() < 0.01  # centred per output dimension
    assert 0.035 < out.std() < 0.065  # the token embeddings' spread
    assert np.abs(default_out).mean() > 20  # what the default init hands the LM for these frames
    again = LinearConnector(DIM, 32)
    standardise_projector(again, frames.mean(0), frames.std(0), token_std=0.05, seed=3)
    assert torch.equal(again.weight, projector.weight) and torch.equal(again.bias, projector.bias)
    with pytest.raises(ModelConfigError, match="frame statistics"):
        standardise_projector(again, frames.mean(0)[:3], frames.std(0)[:3], token_std=0.05)


def test_projector_init_is_validated():
    assert load_config(None).model.projector_init == "standardise"
    with pytest.raises(TrainConfigError, match="model.projector_init"):
        load_config(None, {"model.projector_init": "xavier"})
