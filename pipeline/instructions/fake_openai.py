"""A local OpenAI-compatible HTTP server, for the tests and benchmarks of the instructions stage.

It listens on 127.0.0.1 only and serves what the stage uses: ``POST /v1/chat/completions``,
``POST /v1/files`` (multipart upload), ``GET /v1/files/{id}/content``, ``POST /v1/batches`` and
``GET /v1/batches/{id}``. Every request is recorded in ``requests``.

How it answers a chat request is steered by ``script``: ``{marker: [behaviour, ...]}``; a request
whose user message contains ``marker`` gets the listed behaviours one after the other (the last
one repeats); any other request gets ``default``. Behaviours:

``ok``            a JSON list of three pairs built from the request
``ok_with_bad``   the same plus six pairs the stage's filter must drop, one per reason
``fenced``        the list inside a ```json fence, with chatter around it
``single``        one object instead of a list
``truncated``     the list cut off inside its third object, finish reason ``length``
``garbage``       prose without any JSON
``429``           HTTP 429 with ``Retry-After: retry_after_s``
``500``, ``400``, ``401``, ``404``   that HTTP status with an error body
``hang``          no answer for ``hang_s`` seconds, then ``ok`` (the client should have given up)
``echo_auth``     a pair whose answer repeats the request's Authorization header (a leaky server)

Batches run when first retrieved after ``batch_polls_before_done`` polls: each line is answered
as a chat request with the behaviours above (HTTP errors go to the error file); a line whose
marker's behaviour is ``expire`` is left undone and the batch ends ``expired``, ``fail_batch``
makes the whole batch ``failed``. Output lines are written in reverse order, as the real API
does not keep order either.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class RecordedRequest:
    at: float
    method: str
    path: str
    marker: str | None
    authorization: str | None
    body: Any


@dataclass
class FakeOpenAIServer:
    script: dict[str, list[str]] = field(default_factory=dict)
    default: str = "ok"
    latency_s: float = 0.0
    retry_after_s: float = 1.0
    hang_s: float = 3.0
    api_key: str | None = None  # when set, requests must carry it
    batch_polls_before_done: int = 1
    requests: list[RecordedRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._attempts: dict[str, int] = {}
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self._httpd: ThreadingHTTPServer | None = None

    # -- lifecycle

    def start(self) -> str:
        server = self

        class Handler(_Handler):
            owner = server

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # the listen backlog: a burst of new connections must not be dropped

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self.base_url

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "FakeOpenAIServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what tests look at

    def chat_requests(self) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def behaviour_for(self, marker: str | None) -> str:
        with self._lock:
            if marker is None:
                return self.default
            n = self._attempts.get(marker, 0)
            self._attempts[marker] = n + 1
        steps = self.script[marker]
        return steps[min(n, len(steps) - 1)]

    def marker_of(self, text: str) -> str | None:
        return next((m for m in self.script if m in text), None)

    # -- answers

    def chat_answer(self, body: dict, behaviour: str, authorization: str | None) -> tuple[int, dict, dict]:
        """(status, headers, JSON body) for one chat request."""
        if behaviour in ("429", "500", "400", "401", "404"):
            status = int(behaviour)
            headers = {"Retry-After": f"{self.retry_after_s:g}"} if status == 429 else {}
            return status, headers, {"error": {"message": f"fake error {status}", "type": "fake", "code": behaviour}}
        user = next((m["content"] for m in body.get("messages", []) if m.get("role") == "user"), "")
        pairs = _pairs_from(user)
        finish = "stop"
        if behaviour == "ok_with_bad":
            pairs += _bad_pairs(pairs[0]["question"])
        if behaviour == "echo_auth":
            pairs.append({"question": "What did you receive?", "answer": f"The header was {authorization}."})
        content = json.dumps(pairs)
        if behaviour == "fenced":
            content = f"Here are the pairs:\n```json\n{json.dumps(pairs, indent=2)}\n```\nLet me know if you need more."
        elif behaviour == "single":
            content = json.dumps(pairs[0])
        elif behaviour == "truncated":
            third = _nth(content, '"question"', 3)
            content, finish = content[: third + 15], "length"
        elif behaviour == "garbage":
            content = "I'm sorry, but I can only describe music that I can actually listen to."
        reply = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": {"prompt_tokens": len(json.dumps(body)) // 4, "completion_tokens": len(content) // 4,
                      "total_tokens": len(json.dumps(body)) // 4 + len(content) // 4},
        }
        return 200, {}, reply

    def run_batch(self, batch: dict) -> None:
        lines = [json.loads(x) for x in self.files[batch["input_file_id"]].decode("utf-8").splitlines() if x.strip()]
        outputs, errors, expired = [], [], False
        for line in lines:
            user = json.dumps(line["body"])
            behaviour = self.behaviour_for(self.marker_of(user))
            if behaviour == "fail_batch":
                batch.update(status="failed", errors={"object": "list", "data": [
                    {"code": "invalid_request", "message": "fake batch failure", "line": 1}]})
                return
            if behaviour == "expire":
                expired = True
                errors.append({"id": f"batch_req_{uuid.uuid4().hex[:8]}", "custom_id": line["custom_id"], "response": None,
                               "error": {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."}})
                continue
            status, _, reply = self.chat_answer(line["body"], behaviour, None)
            entry = {"id": f"batch_req_{uuid.uuid4().hex[:8]}", "custom_id": line["custom_id"],
                     "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": reply}, "error": None}
            (outputs if status == 200 else errors).append(entry)
        out_id, err_id = None, None
        if outputs:
            out_id = self._store("".join(json.dumps(e) + "\n" for e in reversed(outputs)).encode())
        if errors:
            err_id = self._store("".join(json.dumps(e) + "\n" for e in errors).encode())
        batch.update(status="expired" if expired else "completed", output_file_id=out_id, error_file_id=err_id,
                     request_counts={"total": len(lines), "completed": len(outputs), "failed": len(errors)})

    def _store(self, data: bytes) -> str:
        file_id = f"file-{uuid.uuid4().hex[:16]}"
        self.files[file_id] = data
        return file_id


def _nth(text: str, needle: str, n: int) -> int:
    pos = -1
    for _ in range(n):
        pos = text.index(needle, pos + 1)
    return pos


def _pairs_from(user: str) -> list[dict]:
    try:
        metadata = json.loads(user)
    except ValueError:
        metadata = {}
    tag = hashlib.sha1(user.encode("utf-8")).hexdigest()[:6]
    tempo = metadata.get("tempo_in_beats_per_minute_madmom") if isinstance(metadata, dict) else None
    key = metadata.get("key_madmom") if isinstance(metadata, dict) else None
    return [
        {"question": "What is the tempo of this music?",
         "answer": f"It moves at about {tempo} beats per minute." if tempo else "It moves at a moderate pace."},
        {"question": "What key is this piece in?", "answer": f"It is in {key}." if key else "It sounds firmly tonal."},
        {"question": f"How would you describe passage {tag}?", "answer": "A lively, well-balanced passage."},
    ]


def _bad_pairs(first_question: str) -> list[dict]:
    return [
        {"question": "What is the value of tempo_in_beats_per_minute_madmom?", "answer": "About 120."},
        {"question": "What genre is it?", "answer": "Based on the metadata, it is rock."},
        {"question": "Who is the artist?", "answer": "A band from Berlin."},
        {"question": "What mood does it have?", "answer": "It is not possible to determine the mood."},
        {"question": first_question.upper(), "answer": "Again, the same question."},
        {"question": "", "answer": "An answer to nothing."},
    ]


class _Handler(BaseHTTPRequestHandler):
    owner: FakeOpenAIServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _send(self, status: int, body: Any, headers: dict | None = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(body).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test)

    def _read(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _authorised(self) -> bool:
        if self.owner.api_key and self.headers.get("Authorization") != f"Bearer {self.owner.api_key}":
            self._send(401, {"error": {"message": "Incorrect API key provided: sk-abc***wxyz", "code": "invalid_api_key"}})
            return False
        return True

    def _record(self, body: Any, marker: str | None) -> None:
        with self.owner._lock:
            self.owner.requests.append(RecordedRequest(time.monotonic(), self.command, self.path, marker,
                                                       self.headers.get("Authorization"), body))

    def do_POST(self) -> None:  # noqa: N802
        raw = self._read()
        owner = self.owner
        if self.path.endswith("/chat/completions"):
            body = json.loads(raw)
            user = next((m["content"] for m in body.get("messages", []) if m.get("role") == "user"), "")
            marker = owner.marker_of(user)
            self._record(body, marker)
            if not self._authorised():
                return
            behaviour = owner.behaviour_for(marker)
            if owner.latency_s:
                time.sleep(owner.latency_s)
            if behaviour == "hang":
                time.sleep(owner.hang_s)
                behaviour = "ok"
            status, headers, reply = owner.chat_answer(body, behaviour, self.headers.get("Authorization"))
            self._send(status, reply, headers)
        elif self.path.endswith("/files"):
            self._record(None, None)
            if not self._authorised():
                return
            fields = _multipart(self.headers.get("Content-Type", ""), raw)
            file_id = owner._store(fields.get("file", b""))
            self._send(200, {"id": file_id, "object": "file", "bytes": len(fields.get("file", b"")),
                             "created_at": int(time.time()), "filename": "input.jsonl", "purpose": "batch",
                             "status": "processed"})
        elif self.path.endswith("/batches"):
            body = json.loads(raw)
            self._record(body, None)
            if not self._authorised():
                return
            batch_id = f"batch_{uuid.uuid4().hex[:12]}"
            batch = {"id": batch_id, "object": "batch", "endpoint": body["endpoint"], "errors": None,
                     "input_file_id": body["input_file_id"], "completion_window": body["completion_window"],
                     "status": "validating", "output_file_id": None, "error_file_id": None,
                     "created_at": int(time.time()), "metadata": body.get("metadata"), "polls": 0,
                     "request_counts": {"total": 0, "completed": 0, "failed": 0}}
            owner.batches[batch_id] = batch
            self._send(200, _public(batch))
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_GET(self) -> None:  # noqa: N802
        owner = self.owner
        if self.path == "/_stats":  # for a server in another process: how many chat requests, how many repeats
            chats = owner.chat_requests()
            contents = [json.dumps(r.body.get("messages"), sort_keys=True) for r in chats]
            return self._send(200, {"chat_requests": len(chats), "repeated": len(contents) - len(set(contents))})
        self._record(None, None)
        if not self._authorised():
            return
        parts = self.path.rstrip("/").split("/")
        if "batches" in parts and parts[-1].startswith("batch_"):
            batch = owner.batches.get(parts[-1])
            if batch is None:
                return self._send(404, {"error": {"message": "no such batch"}})
            batch["polls"] += 1
            if batch["status"] in ("validating", "in_progress"):
                if batch["polls"] > owner.batch_polls_before_done:
                    owner.run_batch(batch)
                else:
                    batch["status"] = "in_progress"
            self._send(200, _public(batch))
        elif parts[-1] == "content" and parts[-2] in owner.files:
            self._send(200, None, raw=owner.files[parts[-2]])
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})


def _public(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "polls"}


def _multipart(content_type: str, raw: bytes) -> dict[str, bytes]:
    boundary = content_type.split("boundary=", 1)[-1].strip().strip('"').encode()
    fields = {}
    for part in raw.split(b"--" + boundary):
        if b"\r\n\r\n" not in part:
            continue
        head, _, data = part.partition(b"\r\n\r\n")
        name = head.split(b'name="', 1)[-1].split(b'"', 1)[0].decode() if b'name="' in head else None
        if name:
            fields[name] = data[:-2] if data.endswith(b"\r\n") else data
    return fields


def main() -> None:
    """Serve on 127.0.0.1 until stdin closes (or ``--max-seconds``), printing the base URL first."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description="A local OpenAI-compatible server for tests and benchmarks.")
    ap.add_argument("--latency", type=float, default=0.0, help="seconds per chat request")
    ap.add_argument("--default", default="ok", help="how to answer chat requests")
    ap.add_argument("--max-seconds", type=float, default=900.0, help="stop after this long in any case")
    args = ap.parse_args()
    server = FakeOpenAIServer(default=args.default, latency_s=args.latency)
    print(server.start(), flush=True)
    stopper = threading.Timer(args.max_seconds, lambda: None)
    stopper.start()
    watcher = threading.Thread(target=sys.stdin.read, daemon=True)
    watcher.start()
    while watcher.is_alive() and stopper.is_alive():
        watcher.join(0.2)
    stopper.cancel()
    server.stop()


if __name__ == "__main__":
    main()
