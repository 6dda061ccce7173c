import errno
import json
import os

import pytest

from pipeline import files


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with files.atomic_write(path, "w") as fh:
        fh.write("new")
        assert path.read_text() == "old"  # not visible until the block ends
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_write_keeps_the_old_file_when_the_block_fails(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with files.atomic_write(path, "w") as fh:
            fh.write("half")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_disk_failure_names_the_target(tmp_path, monkeypatch, code):
    def fail(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.os, "fsync", fail)
    path = tmp_path / "clips.jsonl"
    with pytest.raises(OSError) as info:
        files.write_jsonl(path, [{"id": "a"}])
    assert info.value.filename == str(path)
    assert files.is_disk_failure(info.value)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_keep_false_discards_the_new_content_and_the_old_file(tmp_path):
    path = tmp_path / "shard.tar"
    path.write_bytes(b"old")
    with files.atomic_write(path, keep=lambda: False) as fh:
        fh.write(b"nothing worth keeping")
    assert not path.exists()


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(ValueError):
        with files.atomic_directory(dest) as tmp:
            (tmp / "new.txt").write_text("new")
            raise ValueError("conversion failed")
    assert [p.name for p in dest.iterdir()] == ["old.txt"]
    with files.atomic_directory(dest) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in dest.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_write_json_and_jsonl_round_trip(tmp_path):
    files.write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": [1, 2], "b": 1}
    assert files.write_jsonl(tmp_path / "r.jsonl", [{"id": "x"}, {"id": "ü"}]) == 2
    assert [json.loads(line) for line in (tmp_path / "r.jsonl").read_text(encoding="utf-8").splitlines()] == [
        {"id": "x"}, {"id": "ü"}]


def test_settings_changes_flatten_and_allow_what_may_change():
    before = {"optim": {"lr": 1e-4, "max_steps": 10}, "lora": {"r": 8, "alpha": 16}, "seed": 0}
    now = {"optim": {"lr": 2e-4, "max_steps": 20}, "lora": {"r": 8, "alpha": 32}, "seed": 0}
    assert files.settings_changes(before, now, may_change={"optim.max_steps"}, keep_whole=("lora",)) == [
        ("lora", {"r": 8, "alpha": 16}, {"r": 8, "alpha": 32}), ("optim.lr", 1e-4, 2e-4)]
    assert files.settings_changes(before, before) == []
    assert files.settings_changes([1], [2]) == [("", [1], [2])]


def test_check_same_settings_names_the_field_and_both_values():
    class MyError(ValueError):
        pass

    with pytest.raises(MyError, match=r"out\.jsonl was written with other settings than this run's: "
                                      r"model \("):
        files.check_same_settings("out.jsonl", {"model": "a"}, {"model": "b"}, "use another output", MyError)
    try:
        files.check_same_settings("x", {"model": "a"}, {"model": "b"}, "remedy")
    except ValueError as exc:
        assert '"a" -> "b"' in str(exc) and str(exc).endswith("; remedy")


def test_append_log_resumes_discards_a_torn_line_and_refuses_other_settings(tmp_path):
    path = tmp_path / "out.ledger"
    log = files.AppendLog(path, "ledger", 1, {"settings": {"seed": 0}}, remedy="start over")
    assert log.load() == []
    with log:
        log.append({"id": "a"})
        log.append({"id": "b"})
    with open(path, "ab") as fh:
        fh.write(b'{"id": "c", "o')  # a writer killed mid-line
    again = files.AppendLog(path, "ledger", 1, {"settings": {"seed": 0}}, remedy="start over")
    assert again.load() == [{"id": "a"}, {"id": "b"}]
    assert path.read_bytes().endswith(b'{"id": "b"}\n')
    with again:
        again.append({"id": "c"})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"ledger": 1, "settings": {"seed": 0}}, {"id": "a"}, {"id": "b"}, {"id": "c"}]

    other = files.AppendLog(path, "ledger", 1, {"settings": {"seed": 1}}, remedy="start over")
    with pytest.raises(ValueError, match=r"settings\.seed \(0 -> 1\); start over"):
        other.load()
    newer = files.AppendLog(path, "ledger", 2, {"settings": {"seed": 0}}, remedy="start over")
    with pytest.raises(ValueError, match="not a ledger this version can read"):
        newer.load()


def test_drop_torn_tail_leaves_a_complete_file_alone(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_bytes(b'{"a": 1}\n')
    assert files.drop_torn_tail(path) is False
    path.write_bytes(b'{"a": 1}\n{"a"')
    assert files.drop_torn_tail(path) is True
    assert path.read_bytes() == b'{"a": 1}\n'
    path.write_bytes(b'{"a"')
    assert files.drop_torn_tail(path) is True and path.read_bytes() == b""
    assert files.drop_torn_tail(tmp_path / "missing.jsonl") is False
