"""The reply cache: append-only, shared by processes, tolerant of a writer killed mid-line."""

import multiprocessing

from pipeline.instructions.cache import CachedReply, CacheKey, ReplyCache


def reply(text: str) -> CachedReply:
    return CachedReply(text=text, finish_reason="stop", backend="openai", prompt_tokens=10, completion_tokens=5,
                       cost_usd=0.001, request_sha256="0" * 64)


def key(n: int, writer: int = 0) -> CacheKey:
    return CacheKey(f"clip-{writer}-{n}", "understanding", "gpt-4o-mini", "v1-abcdef12")


def append_many(path, writer: int, count: int) -> None:
    cache = ReplyCache(path)
    for n in range(count):
        cache.put(key(n, writer), reply(f"reply {writer}/{n} " + "x" * (n * 37 % 3000)))
        assert cache.get(key(n, writer)).text.startswith(f"reply {writer}/{n} ")
    cache.close()


def test_replies_survive_a_reopen_and_the_last_one_for_a_key_wins(tmp_path):
    path = tmp_path / "replies.jsonl"
    cache = ReplyCache(path)
    cache.put(key(1), reply("first"))
    cache.put(key(2), reply("second"))
    cache.put(key(1), reply("first, asked again"))
    cache.close()
    again = ReplyCache(path)
    assert len(again) == 2 and again.get(key(1)).text == "first, asked again" and key(3) not in again
    assert again.get(key(2)).text == "second" and again.get(key(2)).prompt_tokens == 10


def test_a_torn_last_line_is_skipped_and_the_next_reply_starts_a_new_line(tmp_path):
    path = tmp_path / "replies.jsonl"
    append_many(path, 0, 3)
    with open(path, "ab") as fh:
        fh.write(b'{"cache": 1, "key": ["clip-0-9", "understanding"')  # a writer killed mid-line
    cache = ReplyCache(path)
    assert len(cache) == 3 and cache.unreadable_lines == 1
    cache.put(key(9), reply("after the tear"))
    cache.close()
    reopened = ReplyCache(path)
    assert len(reopened) == 4 and reopened.get(key(9)).text == "after the tear"


def test_processes_appending_to_one_cache_do_not_interleave(tmp_path):
    path = tmp_path / "replies.jsonl"
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=append_many, args=(path, w, 150)) for w in range(3)]
    for p in writers:
        p.start()
    for p in writers:
        p.join(60)
    assert [p.exitcode for p in writers] == [0, 0, 0]
    cache = ReplyCache(path)
    assert len(cache) == 450 and cache.unreadable_lines == 0
    assert all(cache.get(key(n, w)).text.startswith(f"reply {w}/{n} ") for w in range(3) for n in range(150))
