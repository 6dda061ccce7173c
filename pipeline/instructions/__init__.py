"""The instructions stage: clip records → question/answer pairs per task family (LLark §4.2, G.1).

For every clip record and each of its task families (understanding, captioning, reasoning) a
writer produces question/answer pairs from the clip's JSON (its dataset's annotations and the
augmented tempo, key, chords and beat grid); the pairs are filtered and written as one
instruction record per line:

    {"id": "<clip_id>-<task_family>", "clip_id", "task_family",
     "pairs": [{"question": str, "answer": str}, ...],
     "backend": "template" | "openai" | "openai-batch" | "given",
     "model", "prompt_version", "dataset", "split"}

Writers: the offline template writer (``templates.py``), OpenAI chat models or any
OpenAI-compatible server (``llm.py``, ``chat.py``), and the OpenAI Batch API (``batch.py``).
MusicCaps and YT8M-MusicTextClips captions become captioning pairs as given. Prompts, filter
phrases and prices are plain files under ``prompts/`` (``prompts.py``).

Files beside OUT (``instructions.jsonl`` below):

    instructions.jsonl            the instruction records, in input order (replaced whole)
    instructions.rejected.jsonl   every dropped pair with its reason (replaced whole)
    instructions.errors.jsonl     items that failed, with code and reason (the runner's)
    instructions.items.jsonl      the (clip, family) items the runner runs
    instructions.jsonl.ledger     the runner's ledger: what is done (append-only)
    instructions.replies.jsonl    the reply cache: every model reply ever paid for (append-only)
    instructions.batches.jsonl    Batch API: submitted and collected batches (append-only)
    instructions.batches/         Batch API: request files as uploaded, and their keys

Entry point: ``pipeline.instructions.run.run_instructions``.
"""
