"""The shard reader: splitting across ranks and workers without duplicates, shuffling, exact resume
positions, collation, and the encoder check."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fixtures_train import encoder_manifest, tiny_lm_dir, write_shards  # noqa: E402

from llark.data import (  # noqa: E402
    BadSample, DataConfigError, ExampleEncoder, LoaderState, ShardStream, StreamSettings, check_encoder,
    make_loader, open_shards, worker_shards,
)
from llark.model import IGNORE_INDEX, ChatFormatter, load_tokenizer  # noqa: E402

DIM = 16


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tiny_lm_dir())


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    samples = write_shards(d, n_samples=48, n_shards=8, dim=DIM, pairs=(1, 3))
    return d, samples


def make_stream(tokenizer, shard_dir, max_seq_len=512, **kw):
    shard_set = open_shards([str(shard_dir)])
    encode = ExampleEncoder(ChatFormatter(tokenizer), DIM, max_seq_len, system_prompt=None)
    settings = StreamSettings(**{"micro_batch": 2, "pad_id": tokenizer.pad_token_id, "group_shards": 2,
                                 "buffer_size": 8, **kw})
    return ShardStream(shard_set.urls, encode, settings)


def units(batches):
    """(key, first answer token ids) per example, to tell the pairs of one sample apart."""
    out = []
    for b in batches:
        for row, key in enumerate(b["keys"]):
            out.append((key, tuple(b["labels"][row][b["labels"][row] != IGNORE_INDEX].tolist())))
    return out


def test_worker_shards_cover_every_shard_once_per_epoch():
    for epoch in range(3):
        got = [i for g in range(6) for i in worker_shards(20, epoch, seed=1, global_worker=g, global_workers=6)]
        assert sorted(got) == list(range(20))
    assert worker_shards(20, 0, 1, 0, 6) != worker_shards(20, 1, 1, 0, 6)


def test_ranks_and_workers_read_each_sample_once_per_epoch(tokenizer, shards):
    shard_dir, samples = shards
    expected = Counter({k: len(v["pairs"]) for k, v in samples.items()})
    seen = Counter()
    for rank in range(2):
        stream = make_stream(tokenizer, shard_dir, rank=rank, world_size=2, num_workers=2, epochs=1)
        for worker in range(2):
            seen.update(k for k, _ in units(stream.worker_stream(worker)))
    assert seen == expected  # every pair of every sample, once: no duplicate, nothing lost


def test_dataloader_workers_split_without_duplicates(tokenizer, shards):
    shard_dir, samples = shards
    stream = make_stream(tokenizer, shard_dir, num_workers=2, epochs=1)
    keys = Counter(k for k, _ in units(make_loader(stream)))
    assert keys == Counter({k: len(v["pairs"]) for k, v in samples.items()})


def test_shuffled_deterministic_and_different_each_epoch(tokenizer, shards):
    shard_dir, _ = shards
    a = units(make_stream(tokenizer, shard_dir, epochs=2).worker_stream(0))
    b = units(make_stream(tokenizer, shard_dir, epochs=2).worker_stream(0))
    c = units(make_stream(tokenizer, shard_dir, epochs=2, seed=7).worker_stream(0))
    assert a == b and a != c
    half = len(a) // 2
    assert sorted(a[:half]) == sorted(a[half:]) and a[:half] != a[half:]
    in_shard_order = sorted(a[:half], key=lambda u: u[0])
    assert a[:half] != in_shard_order


def test_multi_turn_keeps_pairs_together(tokenizer, shards):
    shard_dir, samples = shards
    batches = list(make_stream(tokenizer, shard_dir, epochs=1, conversation="multi_turn").worker_stream(0))
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(samples)
    b = batches[0]
    for row, key in enumerate(b["keys"]):
        eos_supervised = ((b["labels"][row] == tokenizer.eos_token_id)).sum().item()
        assert eos_supervised == len(samples[key]["pairs"])


@pytest.mark.parametrize("workers,consumed", [(0, 5), (2, 5), (2, 6)])
def test_resume_position_continues_the_same_sequence(tokenizer, shards, workers, consumed):
    shard_dir, _ = shards
    full = list(b["keys"] for _, b in zip(range(40), make_loader(make_stream(tokenizer, shard_dir, num_workers=workers))))
    state = LoaderState(workers)
    for _, batch in zip(range(consumed), make_loader(make_stream(tokenizer, shard_dir, num_workers=workers))):
        state.update(batch)
    saved = json.loads(json.dumps(state.to_dict()))
    restored = LoaderState.from_dict(saved, workers)
    stream = make_stream(tokenizer, shard_dir, num_workers=workers, start=restored.positions,
                         rotation=restored.rotation)
    resumed = [b["keys"] for _, b in zip(range(40 - consumed), make_loader(stream))]
    assert resumed == full[consumed:]  # crosses group and epoch boundaries (48 samples, ~96 examples)


def test_resume_with_other_worker_count_is_refused():
    with pytest.raises(DataConfigError, match="num_workers=2"):
        LoaderState.from_dict({"num_workers": 2, "rotation": 0, "positions": {}}, 4)


def test_collated_batch(tokenizer, shards):
    shard_dir, samples = shards
    batch = next(iter(make_stream(tokenizer, shard_dir, epochs=1, pad_to_multiple_of=8).worker_stream(0)))
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].shape[0] == 2
    for row, key in enumerate(batch["keys"]):
        n = samples[key]["audio"].shape[0]
        assert batch["audio_frames"][row] == n
        np.testing.assert_array_equal(batch["audio"][row, :n].numpy(), samples[key]["audio"])
        assert (batch["audio"][row, n:] == 0).all()
        length = int(batch["attention_mask"][row].sum())
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row] == tokenizer.convert_tokens_to_ids("<|audio|>")).sum() == n
    assert batch["supervised"] == int((batch["labels"] != IGNORE_INDEX).sum())


def test_too_few_shards_for_the_workers(tokenizer, shards):
    shard_dir, _ = shards
    with pytest.raises(DataConfigError, match="8 shards for 4 ranks x 4 loader workers"):
        make_stream(tokenizer, shard_dir, world_size=4, num_workers=4)


def test_too_long_sample_is_an_error_or_skipped(tokenizer, shards):
    shard_dir, samples = shards
    with pytest.raises(BadSample, match="max_seq_len 20"):
        list(make_stream(tokenizer, shard_dir, max_seq_len=20, epochs=1).worker_stream(0))
    skipped = list(make_stream(tokenizer, shard_dir, max_seq_len=20, epochs=1, on_bad_sample="skip").worker_stream(0))
    assert skipped == []


def test_encoder_dimension_mismatch_is_refused(shards):
    shard_dir, _ = shards
    manifest = open_shards([str(shard_dir)]).manifest
    check_encoder(manifest, DIM)
    with pytest.raises(DataConfigError, match="dimension 16.*projector takes 4800"):
        check_encoder(manifest, 4800)
    trained_on = {**encoder_manifest(DIM), "name": "jukebox", "layer": 36}
    with pytest.raises(DataConfigError, match="name"):
        check_encoder(manifest, DIM, trained_on=trained_on)


def test_shard_directories_of_different_encoders_are_refused(tmp_path):
    write_shards(tmp_path / "a", n_samples=4, n_shards=1, dim=8)
    write_shards(tmp_path / "b", n_samples=4, n_shards=1, dim=12)
    with pytest.raises(DataConfigError, match="another encoder"):
        open_shards([str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(DataConfigError, match="index.json"):
        open_shards([str(tmp_path)])
    with pytest.raises(DataConfigError, match="no valid shards"):
        open_shards([str(tmp_path / "a")], split="valid")


def test_pickled_embedding_is_refused(tokenizer, tmp_path):
    write_shards(tmp_path, n_samples=2, n_shards=1, dim=DIM)
    tar_path = next(tmp_path.glob("*.tar"))
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        for m, data in members:
            if m.name.endswith(".npy"):
                buf = io.BytesIO()
                np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
                data = buf.getvalue()
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    with pytest.raises(BadSample, match="unreadable .npy"):
        list(make_stream(tokenizer, tmp_path, epochs=1).worker_stream(0))
