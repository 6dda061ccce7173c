"""``llark ask``: ask a trained model a question about an audio file (or a batch of them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from llark.commands.common import add_generation_options, add_verb
from llark.options import parse_key_values

if TYPE_CHECKING:
    from llark.inference import Request


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

    from llark.inference import Answerer, GenerationSettings, InferenceError, Request, load
    from pipeline.files import json_line, write_jsonl

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
            requests = [Request(args.question, audio=str(args.audio) if args.audio else None,
                                frames=str(args.frames) if args.frames else None)]
        encoder_options = parse_key_values(args.encoder_option or [], "--encoder-option")
        answerer = Answerer(load(args.checkpoint, args.dtype, args.device), encoder_options, args.start,
                            args.max_seconds)
        results = answerer.answer(requests, settings)
    except InferenceError as exc:
        print(f"llark ask: error: {exc}", file=sys.stderr)
        return 2
    if args.batch is not None:
        if args.out:
            write_jsonl(args.out, results)
        else:
            sys.stdout.write("".join(json_line(r) for r in results))
    elif args.json:
        print(json.dumps(results[0], ensure_ascii=False, indent=2))
    else:
        print(results[0]["answer"])
    return 0


def read_batch(path: Path) -> list[Request]:
    """Requests from JSON lines ``{"audio", "question"}`` (or ``"frames"``) or ``AUDIO<TAB>QUESTION`` lines."""
    from llark.inference import InferenceError, Request

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
        try:
            requests.append(Request(obj.get("question"), audio=obj.get("audio"), frames=obj.get("frames")))
        except InferenceError as exc:
            raise InferenceError(f"{path}: line {number}: {exc}") from None
    if not requests:
        raise InferenceError(f"--batch: {path} holds no question")
    return requests
