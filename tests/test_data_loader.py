"""The shard reader: splitting across ranks and workers without duplicates, shuffling, exact resume
positions, collation, and the encoder check."""

from __future__ import annotations

import io
import itertools
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fixtures_train import encoder_manifest, smollm2_tokenizer_or_skip, tiny_lm_dir, write_shards  # noqa: E402

from llark.data import (  # noqa: E402
    BadSample, DataConfigError, ExampleEncoder, LoaderState, SampleTooLong, ShardStream, StreamSettings, check_encoder,
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


def test_too_long_samples_are_skipped_and_counted_or_an_error(tokenizer, shards):
    shard_dir, samples = shards
    with pytest.raises(SampleTooLong, match="max_seq_len 20"):
        list(make_stream(tokenizer, shard_dir, max_seq_len=20, epochs=1, on_too_long="error").worker_stream(0))
    assert list(make_stream(tokenizer, shard_dir, max_seq_len=20, epochs=1).worker_stream(0)) == []
    # A limit about half the pairs fit: the others are counted, not lost silently, and the run goes on.
    every = list(make_stream(tokenizer, shard_dir, epochs=1).worker_stream(0))
    lengths = sorted(int(n) for b in every for n in b["attention_mask"].sum(dim=1))
    limit = lengths[len(lengths) // 2]
    kept = list(make_stream(tokenizer, shard_dir, max_seq_len=limit, epochs=1).worker_stream(0))
    n_kept, n_too_long = sum(len(b["keys"]) for b in kept), sum(b["too_long"] for b in kept)
    assert n_kept + n_too_long == len(lengths) and n_too_long == sum(n > limit for n in lengths) > 0


def test_multi_turn_counts_the_turns_it_drops_to_fit(tokenizer, shards):
    shard_dir, samples = shards
    whole = list(make_stream(tokenizer, shard_dir, epochs=1, conversation="multi_turn").worker_stream(0))
    assert sum(b["dropped_turns"] for b in whole) == 0
    cut = list(make_stream(tokenizer, shard_dir, max_seq_len=70, epochs=1, conversation="multi_turn").worker_stream(0))
    answers = lambda batches: sum(int((b["labels"] == tokenizer.eos_token_id).sum()) for b in batches)  # noqa: E731
    dropped = sum(b["dropped_turns"] for b in cut)
    too_long = sum(b["too_long"] for b in cut)
    kept_keys = {k for b in cut for k in b["keys"]}
    turns_of_kept = sum(len(samples[k]["pairs"]) for k in kept_keys)
    assert dropped > 0 and answers(cut) == turns_of_kept - dropped, (dropped, too_long)
    assert answers(whole) == sum(len(s["pairs"]) for s in samples.values())


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


# ---------------------------------------------------------------------------------------------
# The fast paths (cached renderings and .npy headers, numpy collation) against a plain reference


def reference_example(tokenizer, sample, pair, max_seq_len, system_prompt=None, frame_pool=1):
    """The straightforward path: np.load, the template rendered anew for every string, one
    tokenization with offsets, labels inside the assistant spans, the placeholder repeated."""
    from llark.data import pool_frames
    from llark.model import build_messages

    audio = pool_frames(np.load(io.BytesIO(sample.npy), allow_pickle=False), frame_pool)
    audio_id, eos = tokenizer.convert_tokens_to_ids("<|audio|>"), tokenizer.eos_token
    pairs = sample.pairs if pair is None else [sample.pairs[pair]]
    while True:
        messages = build_messages(pairs, system_prompt)
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
                spans.append((start, text.index(eos, text.index(m["content"], start) + len(m["content"])) + len(eos)))
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, labels = [], []
        for token, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            n = len(audio) if token == audio_id else 1
            ids += [token] * n
            inside = b > a and any(s <= a and b <= e for s, e in spans)
            labels += [token if inside else IGNORE_INDEX] * n
        if len(ids) <= max_seq_len or len(pairs) == 1:
            return {"key": sample.key, "input_ids": ids, "labels": labels, "audio": audio}
        pairs = pairs[:-1]


def reference_collate(examples, pad_id, pad_to_multiple_of):
    import torch

    length = max(len(e["input_ids"]) for e in examples)
    length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    frames, dim = max(1, max(len(e["audio"]) for e in examples)), examples[0]["audio"].shape[1]
    out = {"input_ids": torch.full((len(examples), length), pad_id, dtype=torch.long),
           "labels": torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long),
           "attention_mask": torch.zeros((len(examples), length), dtype=torch.long),
           "audio": torch.zeros((len(examples), frames, dim), dtype=torch.from_numpy(examples[0]["audio"]).dtype),
           "audio_frames": torch.tensor([len(e["audio"]) for e in examples], dtype=torch.long)}
    for i, e in enumerate(examples):
        t = len(e["input_ids"])
        out["input_ids"][i, :t] = torch.tensor(e["input_ids"])
        out["labels"][i, :t] = torch.tensor(e["labels"])
        out["attention_mask"][i, :t] = 1
        out["audio"][i, :len(e["audio"])] = torch.from_numpy(e["audio"])
    out.update(keys=[e["key"] for e in examples], tokens=int(out["attention_mask"].sum()),
               supervised=int((out["labels"] != IGNORE_INDEX).sum()))
    return out


def assert_identical(batch, expected):
    for name, tensor in expected.items():
        if hasattr(tensor, "dtype"):
            got = batch[name]
            assert (got.dtype, got.shape) == (tensor.dtype, tensor.shape), name
            assert got.contiguous().numpy().tobytes() == tensor.numpy().tobytes(), name
        else:
            assert batch[name] == tensor, name


@pytest.fixture(scope="module", params=["llama2", "smollm2"])
def any_tokenizer(request, tokenizer):
    if request.param == "llama2":
        return tokenizer
    return smollm2_tokenizer_or_skip()


@pytest.mark.parametrize("conversation,system_prompt,frame_pool,max_seq_len", [
    ("pair", None, 1, 512), ("pair", "You are a music assistant.", 2, 512), ("multi_turn", None, 1, 512),
    ("multi_turn", "You are a music assistant.", 3, 70),  # trailing rounds dropped to fit
])
def test_batches_are_byte_identical_to_the_plain_reference(any_tokenizer, tmp_path, conversation, system_prompt,
                                                          frame_pool, max_seq_len):
    tok = any_tokenizer
    write_shards(tmp_path / "f16", n_samples=24, n_shards=2, dim=DIM, pairs=(1, 3), seed=3)
    write_shards(tmp_path / "f32", n_samples=12, n_shards=2, dim=DIM, pairs=(1, 3), seed=4, dtype="float32")
    for shard_dir in (tmp_path / "f16", tmp_path / "f32"):
        encoder = ExampleEncoder(ChatFormatter(tok), DIM, max_seq_len, system_prompt, frame_pool)
        units = []

        def encode(sample, pair):
            units.append((sample, pair))
            return encoder(sample, pair)

        settings = StreamSettings(micro_batch=3, pad_id=tok.pad_token_id, buffer_size=8, group_shards=2,
                                  conversation=conversation, pad_to_multiple_of=8, epochs=2)
        batches = list(ShardStream(open_shards([str(shard_dir)]).urls, encode, settings).worker_stream(0))
        assert sum(len(b["keys"]) for b in batches) == len(units) > 20  # two epochs: the second from warm caches
        if conversation == "multi_turn" and max_seq_len < 512:
            assert any(len(s.pairs) > 1 and (b["labels"][r] == tok.eos_token_id).sum() < len(s.pairs)
                       for b, chunk in zip(batches, (units[i:i + 3] for i in range(0, len(units), 3)))
                       for r, (s, _) in enumerate(chunk))
        for i, batch in enumerate(batches):
            chunk = units[3 * i: 3 * i + 3]
            expected = reference_collate([reference_example(tok, s, p, max_seq_len, system_prompt, frame_pool)
                                          for s, p in chunk], tok.pad_token_id, 8)
            assert_identical(batch, expected)


@pytest.mark.parametrize("dtype", ["float16", "float32", ">f4", "int16"])
@pytest.mark.parametrize("fortran", [False, True])
@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_npy_reader_matches_np_load(dtype, fortran, version):
    from numpy.lib import format as npy

    from llark.data import load_npy

    array = np.arange(6 * 5, dtype=dtype).reshape(6, 5)
    array = np.asfortranarray(array) if fortran else array
    buf = io.BytesIO()
    npy.write_array(buf, array, version=version)
    for _ in range(2):  # the second read takes the parsed header from the cache
        got = load_npy(buf.getvalue())
        assert got.dtype == array.dtype and got.shape == array.shape and got.flags.writeable
        np.testing.assert_array_equal(got, np.load(io.BytesIO(buf.getvalue()), allow_pickle=False))
    with pytest.raises(ValueError):
        load_npy(buf.getvalue()[:-4])
    with pytest.raises(ValueError):
        load_npy(b"not an npy file at all")


def test_finite_check_matches_isfinite():
    from llark.data import all_finite

    specials = [0.0, -0.0, 1.0, 6e-8, 65504.0, -65504.0, np.inf, -np.inf, np.nan]
    for dtype in (np.float16, np.float32):
        for value in specials:
            array = np.ones((4, 3), dtype=dtype)
            array[2, 1] = value
            assert all_finite(array) == bool(np.isfinite(array).all()), (dtype, value)
            assert all_finite(np.asfortranarray(array)) == bool(np.isfinite(array).all())


# ---------------------------------------------------------------------------------------------
# Mixtures


@pytest.fixture(scope="module")
def two_families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    write_shards(root / "understanding", n_samples=40, n_shards=4, dim=DIM, pairs=(1, 1), family="understanding")
    write_shards(root / "captioning", n_samples=8, n_shards=2, dim=DIM, pairs=(1, 1), family="captioning", seed=1)
    return root


def mixture_stream(tokenizer, root, weights, **kw):
    from llark.mixture import MixtureStream

    encode = ExampleEncoder(ChatFormatter(tokenizer), DIM, 512, system_prompt=None)
    settings = StreamSettings(**{"micro_batch": 4, "pad_id": tokenizer.pad_token_id, "group_shards": 2,
                                 "buffer_size": 8, **kw})
    streams = {f: ShardStream(open_shards([str(root / f)]).urls, encode, StreamSettings(**{**settings.__dict__,
                                                                                          "start": {}}))
               for f in weights}
    return MixtureStream(streams, weights, settings)


def test_a_mixture_follows_its_weights_whatever_the_sizes(tokenizer, two_families):
    # 40 understanding samples and 8 captioning ones, asked 2:1: captioning repeats to reach a third.
    batches = itertools.islice(mixture_stream(tokenizer, two_families, {"understanding": 2.0, "captioning": 1.0})
                               .worker_stream(0), 2500)
    drawn = Counter()
    for b in batches:
        drawn.update(b["mixture"])
        assert Counter(k.rsplit("-", 1)[1] for k in b["keys"]) == b["mixture"]  # keys end with their family
    total = sum(drawn.values())
    assert total == 10_000
    assert abs(drawn["captioning"] / total - 1 / 3) < 0.02 and abs(drawn["understanding"] / total - 2 / 3) < 0.02


def test_a_mixture_is_deterministic_and_resumes_exactly(tokenizer, two_families):
    weights = {"understanding": 1.0, "captioning": 3.0}
    first = list(itertools.islice(mixture_stream(tokenizer, two_families, weights).worker_stream(0), 30))
    again = list(itertools.islice(mixture_stream(tokenizer, two_families, weights).worker_stream(0), 30))
    assert [b["keys"] for b in first] == [b["keys"] for b in again]
    resumed = list(itertools.islice(mixture_stream(tokenizer, two_families, weights,
                                                   start={0: first[11]["position"]}).worker_stream(0), 18))
    assert [b["keys"] for b in resumed] == [b["keys"] for b in first[12:]]
    for a, b in zip(resumed, first[12:]):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["audio"], b["audio"])
    other_seed = list(itertools.islice(mixture_stream(tokenizer, two_families, weights, seed=1).worker_stream(0), 30))
    assert [b["keys"] for b in other_seed] != [b["keys"] for b in first]


def test_mixture_settings_are_checked_when_the_config_is_read():
    from llark.train import TrainConfigError, load_config

    with pytest.raises(TrainConfigError, match=r"data.mixture.*weights must be > 0"):
        load_config(None, {"data.mixture": {"understanding": 0}})
    with pytest.raises(TrainConfigError, match=r"data.mixture weighs \['reasoning'\], which data.task_families"):
        load_config(None, {"data.mixture": {"reasoning": 1.0}, "data.task_families": ["understanding"]})
    with pytest.raises(TrainConfigError, match=r"data.mixture"):
        load_config(None, {"data.mixture": {"lyrics": 1.0}})


def test_a_stream_with_fewer_shards_than_workers_shares_them_out_when_asked(tokenizer, two_families):
    urls = open_shards([str(two_families / "captioning")]).urls  # 2 shards, 8 samples
    encode = ExampleEncoder(ChatFormatter(tokenizer), DIM, 512, system_prompt=None)
    settings = StreamSettings(micro_batch=1, pad_id=tokenizer.pad_token_id, num_workers=2, world_size=2, rank=0,
                              epochs=1, buffer_size=4)
    with pytest.raises(DataConfigError, match="2 shards for 2 ranks x 2 loader workers"):
        ShardStream(urls, encode, settings)
    keys = []
    for rank in (0, 1):
        stream = ShardStream(urls, encode, StreamSettings(**{**settings.__dict__, "rank": rank}), share_shards=True)
        for worker in (0, 1):
            keys.append([k for b in stream.worker_stream(worker) for k in b["keys"]])
    assert all(keys) and sorted(k for ks in keys for k in ks) == sorted(f"clip{i:04d}-captioning" for i in range(8))


def test_mixture_streams_per_dataset_and_family(tmp_path):
    from llark.mixture import mixture_cells

    for dataset, n in (("fma", 8), ("musiccaps", 4)):
        write_shards(tmp_path / dataset, n_samples=n, n_shards=2, dim=DIM, family="understanding", name=dataset,
                     dataset=dataset)
        write_shards(tmp_path / dataset, n_samples=n, n_shards=1, dim=DIM, family="captioning", name=dataset,
                     dataset=dataset)
    shards = open_shards([str(tmp_path / "fma"), str(tmp_path / "musiccaps")])
    cells = mixture_cells(shards, {"understanding": 2.0, "captioning": 1.0}, {"fma": 1.0, "musiccaps": 3.0})
    assert {k: (len(urls), w) for k, (urls, w) in cells.items()} == {
        "fma/understanding": (2, 2.0), "fma/captioning": (1, 1.0),
        "musiccaps/understanding": (2, 6.0), "musiccaps/captioning": (1, 3.0)}
    assert set(mixture_cells(shards, None, {"musiccaps": 1.0})) == {"musiccaps"}  # fma left out
    assert {k: len(u) for k, (u, _) in mixture_cells(shards, {"captioning": 1.0, "understanding": 1.0}, None).items()} \
        == {"captioning": 2, "understanding": 4}
    with pytest.raises(DataConfigError, match=r"no shards of \['gtzan'\]"):
        mixture_cells(shards, None, {"gtzan": 1.0})
    plain = tmp_path / "plain"  # an index.json written before shards were cut per dataset
    write_shards(plain, n_samples=4, n_shards=1, dim=DIM)
    index = json.loads((plain / "index.json").read_text())
    (plain / "index.json").write_text(json.dumps({**index, "shards": [
        {k: v for k, v in e.items() if k != "dataset"} for e in index["shards"]]}))
    with pytest.raises(DataConfigError, match="these shards mix datasets"):
        mixture_cells(open_shards([str(plain)]), None, {"demo": 1.0})
