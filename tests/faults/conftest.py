"""Inputs shared by the fault tests: a small demo dataset taken through ingest, crop, embed and
instructions once per session (in this process, on the inline executor)."""

from __future__ import annotations

import json
import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faults.killing import cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CLIPS = 24


@dataclass(frozen=True)
class PipelineData:
    root: Path
    ingested: Path
    clips: Path  # cropped clip records
    embeddings: Path  # the embed stage's directory
    instructions: Path  # template-writer instruction records

    def shards_args(self, out: Path, *extra: str) -> list[str]:
        return ["shards", "--clips", str(self.clips), "--instructions", str(self.instructions),
                "--embeddings", str(self.embeddings), "--out", str(out), "--shard-samples", "1", *extra]


@pytest.fixture(scope="session")
def pipeline_data(tmp_path_factory) -> PipelineData:
    d = tmp_path_factory.mktemp("pipeline")
    steps = [
        ("demo-data", "--out", d / "src", "--clips", CLIPS, "--duration", 4),
        ("ingest", "demo", "--root", d / "src", "--out", d / "in.jsonl"),
        ("crop", d / "in.jsonl", "--out", d / "clips.jsonl", "--clips-dir", d / "clips", "--executor", "inline",
         "--no-progress"),
        ("embed", d / "clips.jsonl", "--embeddings-dir", d / "emb", "--executor", "inline", "--no-progress"),
        ("instructions", d / "clips.jsonl", "--out", d / "instructions.jsonl", "--backend", "template",
         "--executor", "inline", "--no-progress"),
    ]
    for step in steps:
        assert cli(*step) == 0, step
    return PipelineData(d, d / "in.jsonl", d / "clips.jsonl", d / "emb", d / "instructions.jsonl")


@pytest.fixture(scope="session")
def many_clips(pipeline_data, tmp_path_factory) -> Path:
    """The cropped clip records ten times over under new ids: 240 clips, 480 instruction items
    (the instructions stage reads records only, so the copies share their audio)."""
    records = [json.loads(line) for line in pipeline_data.clips.read_text().splitlines()]
    path = tmp_path_factory.mktemp("many") / "clips.jsonl"
    path.write_text("".join(json.dumps({**r, "id": f"{r['id']}-x{k}"}) + "\n" for k in range(10) for r in records))
    return path


@pytest.fixture
def fault_rng() -> random.Random:
    """Where the kills land; set LLARK_FAULT_SEED to replay a failure (the seed is printed)."""
    seed = int(os.environ.get("LLARK_FAULT_SEED", random.randrange(2**32)))
    print(f"LLARK_FAULT_SEED={seed}")
    return random.Random(seed)


@pytest.fixture(scope="session")
def reference_shards(pipeline_data, tmp_path_factory) -> Path:
    """The shards of ``pipeline_data`` from one uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "shards"
    assert cli(*pipeline_data.shards_args(out, "--executor", "inline", "--no-progress")) == 0
    return out


@pytest.fixture(scope="session")
def many_instructions(many_clips, tmp_path_factory) -> Path:
    """The instruction records of ``many_clips`` from one uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "instructions.jsonl"
    assert cli("instructions", many_clips, "--out", out, "--backend", "template", "--executor", "inline",
               "--no-progress") == 0
    return out


class SmallDisk:
    """A directory on a tmpfs of its own, of a chosen size (mounting needs root). Where mounting is
    not allowed (or LLARK_FAULTS_NO_MOUNT is set), ``mount`` returns False and the tests inject
    ENOSPC instead."""

    def __init__(self, path: Path):
        self.path = path
        self.mounted = False

    def mount(self, size: str) -> bool:
        if os.environ.get("LLARK_FAULTS_NO_MOUNT"):
            return False
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.path)],
                                  capture_output=True)
        except FileNotFoundError:
            return False
        self.mounted = done.returncode == 0
        return self.mounted

    def resize(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True, capture_output=True)

    def unmount(self) -> None:
        if self.mounted and subprocess.run(["umount", str(self.path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)  # still busy: detach it
        self.mounted = False


@pytest.fixture
def small_disk(tmp_path):
    disk = SmallDisk(tmp_path / "disk")
    disk.path.mkdir()
    try:
        yield disk
    finally:
        disk.unmount()
