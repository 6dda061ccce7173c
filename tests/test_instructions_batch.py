"""The Batch API path against the local server's files and batches endpoints: prepare, submit,
poll, collect, resubmit what expired, and resume from the log or from a batch id."""

import json
from collections import Counter

from instructions_fixtures import KEY, clip, errors, marked, run
from pipeline.instructions.costs import RESERVE_FACTOR, ModelPrice, estimate_prompt_tokens
from pipeline.instructions.fake_openai import FakeOpenAIServer
from pipeline.instructions.prompts import load_prompt_set
from pipeline.instructions.stage import read_instruction_records as read_records
from pipeline.records import read_jsonl


def batch_run(tmp_path, server, clips, **options):
    return run(tmp_path, server, clips, backend="openai-batch", batch_poll_s=0.01, **options)


def uploaded_files(server) -> list[list[dict]]:
    """The request files of the server's batches, in the order the batches were created."""
    inputs = [b["input_file_id"] for b in server.batches.values()]
    return [[json.loads(line) for line in server.files[f].decode().splitlines()] for f in inputs]


def test_submit_poll_and_collect(tmp_path):
    clips = [clip("fma", 1), clip("fma", 2), clip("musiccaps", 1)]
    with FakeOpenAIServer(default="ok_with_bad", batch_polls_before_done=2) as server:
        failed, lines = batch_run(tmp_path, server, clips)
        assert server.chat_requests() == []  # nothing went through the synchronous endpoint
        files = uploaded_files(server)
        batches = dict(server.batches)
        failed_again, _ = batch_run(tmp_path, server, clips)  # a rerun has nothing left to do
        assert len(server.batches) == 2
    assert failed == failed_again == 0
    records = read_records(tmp_path / "out.jsonl")
    assert [r["backend"] for r in records] == ["openai-batch"] * 4 + ["given"]
    assert all(len(r["pairs"]) == 3 for r in records[:4])
    assert len(read_jsonl(tmp_path / "out.rejected.jsonl")) == 24
    # one model per file; every line a chat request whose custom_id is the item id
    assert sorted({line["body"]["model"] for line in f}.pop() for f in files) == ["gpt-3.5-turbo", "gpt-4"]
    lines_sent = [line for f in files for line in f]
    assert sorted(line["custom_id"] for line in lines_sent) == sorted(r["id"] for r in records[:4])
    assert all(line["method"] == "POST" and line["url"] == "/v1/chat/completions" for line in lines_sent)
    reasoning = next(line for line in lines_sent if line["custom_id"] == "fma-000001-reasoning")
    assert reasoning["body"]["messages"][0]["content"] == load_prompt_set().system_prompt("fma", "reasoning")
    assert all(b["status"] == "completed" and b["completion_window"] == "24h" for b in batches.values())
    log = [json.loads(x) for x in (tmp_path / "out.batches.jsonl").read_text().splitlines()]
    assert Counter(e["event"] for e in log) == {"submitted": 2, "collected": 2}
    text = "\n".join(lines)
    assert "submitted 4 requests in 2 batches" in text and "collected 2 batches (completed 2): 4 replies" in text


def test_replies_cost_the_batch_price(tmp_path):
    price = {"gpt-3.5-turbo": ModelPrice(2.0, 4.0)}
    with FakeOpenAIServer() as server:
        batch_run(tmp_path / "b", server, [marked(0, "m0")], price_overrides=price)
        run(tmp_path / "s", server, [marked(0, "m0")], price_overrides=price)
    (batch_entry,), (sync_entry,) = (read_jsonl(tmp_path / d / "out.replies.jsonl") for d in ("b", "s"))
    assert batch_entry["reply"]["backend"] == "openai-batch" and sync_entry["reply"]["backend"] == "openai"
    assert batch_entry["reply"]["prompt_tokens"] == sync_entry["reply"]["prompt_tokens"]
    assert abs(batch_entry["reply"]["cost_usd"] - sync_entry["reply"]["cost_usd"] / 2) < 1e-9


def test_failed_and_expired_requests(tmp_path):
    script = {"m-ok": ["ok"], "m-bad": ["400"], "m-expired": ["expire", "ok"], "m-truncated": ["truncated"]}
    clips = [marked(i, m) for i, m in enumerate(script)]
    with FakeOpenAIServer(script=script) as server:
        failed, lines = batch_run(tmp_path, server, clips)
        done = {r["id"] for r in read_records(tmp_path / "out.jsonl")}
        assert done == {"mtgjamendo-000000-understanding", "mtgjamendo-000003-understanding"}
        assert failed == 1
        err = errors(tmp_path)["mtgjamendo-000001-understanding"]
        assert err["code"] == "batch_request_failed" and "HTTP 400" in err["reason"]
        assert "mtgjamendo-000002-understanding" not in errors(tmp_path)  # expired is not failed: it goes again
        assert any("1 to submit again" in line for line in lines)
        assert any("1 items wait for a batch reply" in line for line in lines)
        failed, lines = batch_run(tmp_path, server, clips)  # resubmits the expired (and the failed) requests
        second = uploaded_files(server)[-1] if len(server.batches) == 2 else None
    assert failed == 1
    assert {r["id"] for r in read_records(tmp_path / "out.jsonl")} == done | {"mtgjamendo-000002-understanding"}
    assert second is not None and sorted(line["custom_id"] for line in second) == [
        "mtgjamendo-000001-understanding", "mtgjamendo-000002-understanding"]


def test_a_failed_batch_fails_its_items_with_the_reason(tmp_path):
    with FakeOpenAIServer(script={"m-x": ["fail_batch"]}) as server:
        failed, _ = batch_run(tmp_path, server, [marked(0, "m-x"), marked(1, "m-y")])
    assert failed == 2
    reasons = {e["reason"] for e in errors(tmp_path).values()}
    assert len(reasons) == 1 and "failed: invalid_request: fake batch failure" in reasons.pop()


def test_submit_without_waiting_then_collect_from_the_log_or_a_batch_id(tmp_path):
    clips = [marked(i, f"m{i}") for i in range(3)]
    with FakeOpenAIServer(batch_polls_before_done=1) as server:
        failed, lines = batch_run(tmp_path, server, clips, batch_wait=False)
        assert failed == 0 and read_jsonl(tmp_path / "out.jsonl") == []
        assert any("still running" in line for line in lines) and len(server.batches) == 1
        (batch_id,) = server.batches
        # the same command later: collects the batch from the log, submits nothing new
        failed, lines = batch_run(tmp_path, server, clips, batch_wait=False)
        assert len(server.batches) == 1 and len(read_records(tmp_path / "out.jsonl")) == 3
        # another machine, without the log or the cache: adopt the batch by its id
        other = tmp_path / "elsewhere"
        failed, lines = batch_run(other, server, clips, batch_id=batch_id)
        assert len(server.batches) == 1
    assert failed == 0
    assert read_records(other / "out.jsonl") == read_records(tmp_path / "out.jsonl")
    assert KEY not in (other / "out.batches.jsonl").read_text()


def test_batch_files_respect_the_size_limits_and_the_cost_cap(tmp_path):
    clips = [marked(i, f"m{i}") for i in range(5)]
    with FakeOpenAIServer() as server:
        failed, _ = batch_run(tmp_path / "a", server, clips, batch_max_requests=2)
        assert [len(f) for f in uploaded_files(server)] in ([2, 2, 1], [2, 1, 2], [1, 2, 2])
        first_line = uploaded_files(server)[0][0]
        one_line = len(json.dumps(first_line).encode()) + 1
        server.batches.clear()
        batch_run(tmp_path / "b", server, clips, batch_max_bytes=int(one_line * 2.5))
        assert max(len(f) for f in uploaded_files(server)) <= 2 and sum(len(f) for f in uploaded_files(server)) == 5
        server.batches.clear()
        price = ModelPrice(1000.0, 1000.0)
        worst = price.cost(RESERVE_FACTOR * estimate_prompt_tokens(first_line["body"]["messages"]), 2000, discount=0.5)
        failed, lines = batch_run(tmp_path / "c", server, clips, max_cost=round(2.5 * worst, 2),
                                  price_overrides={"gpt-3.5-turbo": price})
        assert sum(len(f) for f in uploaded_files(server)) == 2
    assert failed == 0
    assert any(f"3 requests not submitted: --max-cost ${2.5 * worst:.2f}" in line for line in lines)


def test_a_batch_the_server_does_not_know_is_submitted_again(tmp_path):
    clips = [marked(0, "m0")]
    with FakeOpenAIServer() as server:
        batch_run(tmp_path, server, clips, batch_wait=False)
        server.batches.clear()  # e.g. the log came from another account
        failed, lines = batch_run(tmp_path, server, clips)
        assert len(server.batches) == 1
    assert failed == 0 and len(read_records(tmp_path / "out.jsonl")) == 1
    log = [json.loads(x) for x in (tmp_path / "out.batches.jsonl").read_text().splitlines()]
    assert [e.get("status") for e in log if e["event"] == "collected"][0] == "not_found"
