"""pipeline.shard_reader reads the same samples as webdataset's tar iterator, and names the shard and
byte offset of whatever is wrong."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline.encoders import write_manifest
from pipeline.records import ClipRecord
from pipeline.runner import InlineExecutor
from pipeline.shard_reader import (
    CorruptShard,
    DuplicateMember,
    PickledMember,
    ShardReadError,
    TruncatedShard,
    iter_members,
    iter_samples,
    npy_array,
    split_name,
)
from pipeline.shards import INDEX_JSON, build_shards, tar_member

DIM = 8


def webdataset_samples(url):
    """What llark.data reads for training today: gopen + tar_file_iterator + group_by_keys."""
    stream = gopen(url)
    try:
        return list(group_by_keys({**m, "__url__": url} for m in tar_file_iterator(stream)))
    finally:
        stream.close()


def npy_bytes(array, allow_pickle=False):
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def write_tar(path, members, format=tarfile.PAX_FORMAT):
    """``members``: (name, bytes) for files, or ready TarInfo objects (directories, links)."""
    with tarfile.open(path, "w", format=format) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                tar.addfile(tar_member(name, len(data)), io.BytesIO(data))
    return path


def member_offsets(path):
    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data, m.size) for m in tar.getmembers()]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shards written by the shards stage: 10 clips, two task families, at most 3 samples a shard."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    write_manifest(root / "emb", {"manifest_version": 1, "name": "testenc", "layer": None, "frame_rate_hz": 10.0,
                                  "dim": DIM, "dtype": "float16", "config": {}, "packages": {}})
    clips, records, instructions = [], [], []
    for k in range(10):
        cid = f"clip-{k:02d}"
        clips.append(ClipRecord(id=cid, dataset="fixture", split="train", audio_path=f"/data/{cid}.wav",
                                task_families=["understanding", "reasoning"], start_s=0.0, end_s=25.0).to_json())
        path = root / "emb" / "fixture" / f"{cid}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, rng.standard_normal((5 + 7 * k, DIM)).astype(np.float16))  # sizes on and off 512-byte blocks
        records.append(json.dumps({"id": cid, "dataset": "fixture", "split": "train", "embedding_path": str(path),
                                   "frames": 5 + 7 * k, "dim": DIM, "dtype": "float16", "encoder": "testenc"}))
        for family in ("understanding", "reasoning"):
            instructions.append(json.dumps({
                "id": f"{cid}-{family}", "clip_id": cid, "task_family": family,
                "pairs": [{"question": f"What about {cid}?", "answer": "x" * (1 + k * 37)}],
                "backend": "template", "model": "none", "prompt_version": "v1",
                "dataset": "fixture", "split": "train"}))
    (root / "clips.jsonl").write_text("\n".join(clips) + "\n")
    (root / "emb" / "embeddings.jsonl").write_text("\n".join(records) + "\n")
    (root / "instructions.jsonl").write_text("\n".join(instructions) + "\n")
    summary = build_shards(root / "clips.jsonl", root / "instructions.jsonl", root / "emb", root / "out",
                           shard_samples=3, executor=InlineExecutor(), progress=False)
    assert summary.complete and summary.samples == 20
    index = json.loads((root / "out" / INDEX_JSON).read_text())
    return [root / "out" / s["file"] for s in index["shards"]]


def test_same_samples_keys_and_bytes_as_webdataset_on_stage_shards(shards):
    assert len(shards) >= 6
    total = 0
    for path in shards:
        ours = list(iter_samples(str(path)))
        theirs = webdataset_samples(str(path))
        assert ours == theirs and len(ours) >= 1
        total += len(ours)
        for sample in ours:
            assert set(sample) == {"__key__", "__url__", "npy", "json"} and isinstance(sample["npy"], bytes)
            array = npy_array(sample["npy"])
            assert np.array_equal(array, np.load(io.BytesIO(sample["npy"]), allow_pickle=False))
            assert array.dtype == np.float16 and array.shape[1] == DIM and not array.flags.writeable
            assert json.loads(sample["json"])["key"] == sample["__key__"]
    assert total == 20


def test_file_and_pipe_urls_read_the_same_samples(shards):
    path = shards[0]
    expected = [{k: v for k, v in s.items() if k != "__url__"} for s in iter_samples(str(path))]
    for url in (f"file://{path}", f"pipe:cat {path}"):
        samples = list(iter_samples(url))
        assert [{k: v for k, v in s.items() if k != "__url__"} for s in samples] == expected
        assert {s["__url__"] for s in samples} == {url}


def test_members_carry_their_tar_offsets(shards):
    path = shards[0]
    with open(path, "rb") as fh:
        members = [(m.name, m.offset, m.data_offset, len(m.data)) for m in iter_members(fh, path.name)]
    assert members == member_offsets(path)


def test_dots_in_keys_split_at_the_first_dot_as_webdataset_does(tmp_path):
    long_key = "a" * 120 + ".v2"  # longer than a ustar name: a pax header carries it
    directory = tarfile.TarInfo("folder")
    directory.type = tarfile.DIRTYPE
    link = tarfile.TarInfo("link.npy")
    link.type, link.linkname = tarfile.SYMTYPE, "clip.v1.npy"
    members = [
        ("clip.v1.npy", npy_bytes(np.ones((2, DIM), np.float16))), ("clip.v1.json", b'{"k": 1}'),
        ("clip.v2.npy", b"other"),  # same key "clip", extension "v2.npy"
        directory, link, ("__meta__", b"skipped"),
        ("dir/sub.x.TXT", b"upper-case extension"), ("dir/sub.x.json", b"{}"),
        (f"{long_key}.npy", b"long"), ("péché.mignon.json", b"{}"), ("noextension", b"dropped"),
    ]
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        path = write_tar(tmp_path / f"dots-{fmt}.tar", members, format=fmt)
        ours = list(iter_samples(str(path)))
        assert ours == webdataset_samples(str(path))
        assert [s["__key__"] for s in ours] == ["clip", "dir/sub", "a" * 120, "péché"]
        assert set(ours[0]) - {"__key__", "__url__"} == {"v1.npy", "v1.json", "v2.npy"}
        assert ours[1]["x.txt"] == b"upper-case extension" and ours[2]["v2.npy"] == b"long"
    assert split_name("a.b.c") == ("a", "b.c") and split_name("d/e.f") == ("d/e", "f")
    assert split_name("noextension") == (None, None)


def test_a_truncated_tar_names_the_shard_and_the_member_offset(shards, tmp_path):
    source = shards[0]
    data = source.read_bytes()
    listing = member_offsets(source)
    name, offset, data_offset, size = listing[2]  # the second sample's array
    complete = webdataset_samples(str(source))
    cuts = {
        "inside a member's data": (data_offset + size // 2, offset),
        "between members": (listing[4][1], listing[4][1]),
        "inside a header": (listing[4][1] + 100, listing[4][1]),
        "inside the padding": (listing[3][2] + listing[3][3] + 1, listing[4][1]),
    }
    if listing[3][3] % 512 == 0:
        del cuts["inside the padding"]
    for label, (cut, expected_offset) in cuts.items():
        path = tmp_path / f"{source.stem}-cut.tar"
        path.write_bytes(data[:cut])
        read = []
        with pytest.raises(TruncatedShard) as exc:
            for sample in iter_samples(str(path), shard=path.name):
                read.append(sample)
        assert (exc.value.shard, exc.value.offset, exc.value.code) == (path.name, expected_offset, "truncated"), label
        assert f"{path.name} @ byte {expected_offset}" in str(exc.value)
        assert read == [{**s, "__url__": str(path)} for s in complete[: len(read)]] and len(read) < len(complete)
        with pytest.raises(TruncatedShard) as exc:  # a stream, whose size is not known in advance
            list(iter_samples(f"pipe:cat {path}", shard=path.name))
        assert exc.value.offset == expected_offset, label
    # The end-of-archive blocks missing after the last whole member: webdataset's reader takes it as the end.
    last_end = listing[-1][2] + listing[-1][3] + (-listing[-1][3] % 512)
    path.write_bytes(data[:last_end])
    with pytest.raises(TruncatedShard, match="without the end-of-archive blocks"):
        list(iter_samples(str(path)))
    assert len(webdataset_samples(str(path))) == len(complete)


def test_a_corrupt_header_is_reported_at_its_offset(shards, tmp_path):
    data = bytearray(shards[0].read_bytes())
    offset = member_offsets(shards[0])[2][1]
    data[offset + 148 : offset + 156] = b"99999999"  # the header checksum
    path = tmp_path / "corrupt.tar"
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShard) as exc:
        list(iter_samples(str(path)))
    assert exc.value.offset == offset and exc.value.code == "bad_header"
    assert len(webdataset_samples(str(path))) == 1  # tarfile stops there silently, as if the archive ended


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickles_are_refused_never_decoded(tmp_path):
    import pickle

    marker = tmp_path / "unpickled"
    payload = pickle.dumps(Payload(str(marker)))
    good = npy_bytes(np.zeros((2, DIM), np.float16))
    for name in ("s1.pyd", "s1.data.pkl", "s1.PTH"):
        members = [("s0.npy", good), ("s0.json", b"{}"), ("s1.npy", good), (name, payload)]
        path = write_tar(tmp_path / "pickle.tar", members)
        read = []
        with pytest.raises(PickledMember) as exc:
            for sample in iter_samples(str(path)):
                read.append(sample)
        assert exc.value.offset == member_offsets(path)[3][1] and exc.value.key == "s1" and name in str(exc.value)
        assert [s["__key__"] for s in read] == ["s0"]
    object_array = npy_bytes(np.array([Payload(str(marker))], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        npy_array(object_array)
    assert not marker.exists()


def test_a_repeated_extension_in_one_sample_is_an_error_like_webdataset(tmp_path):
    path = write_tar(tmp_path / "dup.tar", [("k.npy", b"1"), ("k.json", b"{}"), ("k.json", b"{}")])
    with pytest.raises(ValueError):
        webdataset_samples(str(path))
    with pytest.raises(DuplicateMember) as exc:
        list(iter_samples(str(path)))
    assert exc.value.offset == member_offsets(path)[2][1] and isinstance(exc.value, ShardReadError)


def test_npy_array_checks_its_input():
    for array in (np.arange(12, dtype=np.float32).reshape(3, 4), np.asfortranarray(np.ones((3, 5), np.float16)),
                  np.zeros((0, 4), np.float16), np.float32(3.5)):
        assert np.array_equal(npy_array(npy_bytes(array)), array)
    data = npy_bytes(np.ones((3, 4), np.float16))
    with pytest.raises(ValueError, match="bytes of data"):
        npy_array(data[:-2])
    with pytest.raises(ValueError, match="magic"):
        npy_array(b"not an array at all")
