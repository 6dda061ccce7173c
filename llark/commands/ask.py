"""``llark ask``: ask a trained model a question about an audio file (or a batch of them)."""

from __future__ import annotations

import json
from pathlib import Path

from llark.commands.common import add_generation_options, add_verb, parse_key_values


def register(sub) -> None:
    from llark.inference import DEFAULT_MAX_SECONDS, WINDOW_S

    from llark.commands.embed import OptionalDefaultsFormatter

    p = add_verb(
        sub, "ask", "ask a trained model a question about an audio file",
        "Load a trained model (the exported directory: train output_dir/final), encode the audio with\n"
        "the encoder named in its llark_config.json, and generate an answer (greedy unless --sample).\n\n"
        f"The audio is cut into consecutive {WINDOW_S:g} s windows from --start, up to --max-seconds; each\n"
        "window is encoded on its own and the frames are concatenated (a 60 s file with --max-seconds 60\n"
        "gives 25 + 25 + 10 s of frames). Precomputed frames (.npy, [frames, dim]) instead of audio:\n"
        "llark ask CHECKPOINT \"QUESTION\" --frames FRAMES.npy\n\n"
        "Batch mode (--batch FILE): one question per line, either JSON {\"audio\": PATH, \"question\": TEXT}\n"
        "or AUDIO<TAB>QUESTION; answers are written as JSON lines (to --out, or stdout). Each audio file\n"
        "is encoded once.",
    )
    p.formatter_class = OptionalDefaultsFormatter
    p.add_argument("checkpoint", type=Path, help="exported model directory (train output_dir/final)")
    p.add_argument("audio", nargs="?", type=Path, help="audio file (any format libsndfile reads)")
    p.add_argument("question", nargs="?", help="the question, e.g. \"What is the key of this song?\"")
    p.add_argument("--frames", type=Path, default=None, help="precomputed frames (.npy) instead of AUDIO")
    p.add_argument("--batch", type=Path, default=None, help="file of (audio, question) lines")
    p.add_argument("--out", type=Path, default=None, help="batch mode: write the answers here (default: stdout)")
    p.add_argument("--json", action="store_true", help="print a JSON object (question, answer, windows, frames)")
    p.add_argument("--start", type=float, default=0.0, help="where in the audio to start, in seconds")
    p.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                   help=f"how much audio to encode, in consecutive {WINDOW_S:g} s windows")
    p.add_argument("--encoder-option", action="append", default=None, metavar="KEY=VALUE",
                   help="encoder option, e.g. weights_dir=/models/jukebox for the jukebox encoder")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit in tokens")
    add_generation_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from llark.inference import GenerationSettings, InferenceError

    try:
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                      temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        if args.batch is not None:
            if args.audio is not None or args.frames is not None:
                raise InferenceError("--batch takes its audio and questions from the file; give no AUDIO or --frames")
            requests = read_batch(args.batch)
        else:
            if args.question is None and args.frames is not None and args.audio is not None:
                args.question, args.audio = str(args.audio), None  # `ask CKPT "question" --frames F`
            if args.question is None or (args.audio is None) == (args.frames is None):
                raise InferenceError("give AUDIO and a QUESTION (or --frames FILE and a QUESTION, or --batch FILE)")
            requests = [{"audio": str(args.audio) if args.audio else None,
                         "frames": str(args.frames) if args.frames else None, "question": args.question}]
        results = answer_requests(args.checkpoint, requests, settings, args.start, args.max_seconds,
                                  {k: v for k, v in parse_key_values(args.encoder_option or [], "--encoder-option").items()},
                                  args.dtype, args.device)
    except InferenceError as exc:
        print(f"llark ask: error: {exc}", file=sys.stderr)
        return 2
    if args.batch is not None:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
        if args.out:
            args.out.write_text(lines, encoding="utf-8")
        else:
            sys.stdout.write(lines)
    elif args.json:
        print(json.dumps(results[0], ensure_ascii=False, indent=2))
    else:
        print(results[0]["answer"])
    return 0


def read_batch(path: Path) -> list[dict]:
    """Requests from JSON lines ``{"audio", "question"}`` (or ``"frames"``) or ``AUDIO<TAB>QUESTION`` lines."""
    from llark.inference import InferenceError

    if not path.is_file():
        raise InferenceError(f"--batch: {path} does not exist")
    requests = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise InferenceError(f"{path}: line {number} is not valid JSON ({exc})") from None
        else:
            parts = line.split("\t", 1)
            if len(parts) != 2:
                raise InferenceError(f"{path}: line {number}: expected AUDIO<TAB>QUESTION or a JSON object")
            obj = {"audio": parts[0], "question": parts[1]}
        if not isinstance(obj.get("question"), str) or not obj["question"].strip() or \
                (obj.get("audio") is None) == (obj.get("frames") is None):
            raise InferenceError(f"{path}: line {number}: needs a question and one of audio or frames")
        requests.append({"audio": obj.get("audio"), "frames": obj.get("frames"), "question": obj["question"]})
    if not requests:
        raise InferenceError(f"--batch: {path} holds no question")
    return requests


def answer_requests(checkpoint: Path, requests: list[dict], settings, start_s: float, max_seconds: float,
                    encoder_options: dict, dtype: str = "auto", device: str | None = None,
                    batch_size: int = 8) -> list[dict]:
    """Answer each request; audio files are encoded once each, frames files read once each."""
    from llark.inference import build_encoder_for, encode_file, load, read_frames

    llark = load(checkpoint, dtype, device)
    encoder = None
    encoded: dict[tuple[str, str], tuple] = {}
    for r in requests:
        source = ("frames", r["frames"]) if r.get("frames") else ("audio", r["audio"])
        if source in encoded:
            continue
        if source[0] == "frames":
            encoded[source] = (read_frames(source[1], llark.encoder_dim), None)
        else:
            encoder = encoder or build_encoder_for(llark, encoder_options)
            encoded[source] = encode_file(source[1], encoder, start_s, max_seconds)
    results = []
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        sources = [("frames", r["frames"]) if r.get("frames") else ("audio", r["audio"]) for r in batch]
        answers = llark.answer([r["question"] for r in batch], [encoded[s][0] for s in sources], settings)
        for r, s, answer in zip(batch, sources, answers):
            frames, spans = encoded[s]
            results.append({
                s[0]: s[1], "question": r["question"], "answer": answer, "frames": int(frames.shape[0]),
                "windows": [[round(a, 3), round(b, 3)] for a, b in spans] if spans else None,
                "model": str(checkpoint), "generation": settings.to_dict(),
            })
    return results
