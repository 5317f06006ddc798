"""Small pieces on their own: retry policy, lease, layout safety, globs, parsing of sources and settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.config import build_settings, parse_duration, parse_size
from agent.errors import InvalidInput, Retryable, TransientError
from agent.layout import HubCacheLayout, atomic_write, relative_symlink, safe_relpath
from agent.lease import Lease, LeaseWatch
from agent.plan import apply_globs
from agent.retry import RetryPolicy, call_with_retry
from agent.sources.base import RemoteFile, parse_source


# -- retry ----------------------------------------------------------------------------------------
def test_retry_gives_up_after_budget_and_keeps_cause():
    calls, sleeps = [], []

    def attempt():
        calls.append(1)
        raise Retryable("http_503", "boom")

    with pytest.raises(TransientError) as info:
        call_with_retry(attempt, policy=RetryPolicy(max_failures=4, base_delay=1), what="x", sleep=sleeps.append, rng=lambda: 1.0)
    assert len(calls) == 4
    assert isinstance(info.value.__cause__, Retryable)
    assert sleeps == [1.0, 2.0, 4.0]  # exponential, capped jitter at rng()=1


def test_retry_budget_resets_when_bytes_arrive():
    progress = {"n": 0}
    calls = []

    def attempt():
        calls.append(1)
        if len(calls) < 20:
            progress["n"] += 1  # every failed attempt still made progress
            raise Retryable("truncated", "cut")
        return "ok"

    assert call_with_retry(attempt, policy=RetryPolicy(max_failures=3), what="x", progress_mark=lambda: progress["n"],
                           sleep=lambda s: None) == "ok"
    assert len(calls) == 20


def test_retry_honours_retry_after_and_not_other_errors():
    sleeps = []
    seq = iter([Retryable("http_429", "slow down", retry_after=7), None])

    def attempt():
        exc = next(seq)
        if exc:
            raise exc
        return 1

    call_with_retry(attempt, policy=RetryPolicy(), what="x", sleep=sleeps.append)
    assert sleeps == [7]
    with pytest.raises(ValueError):
        call_with_retry(lambda: (_ for _ in ()).throw(ValueError("no")), policy=RetryPolicy(), what="x", sleep=sleeps.append)


# -- layout ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../x", "a/../../x", "/etc/passwd", "a\\b", "", "a//b", "./a", "C:/x", ".model-agent/ready"])
def test_safe_relpath_refuses_escapes(bad):
    with pytest.raises(InvalidInput):
        safe_relpath(bad, context="t")


def test_safe_relpath_accepts_nested():
    assert safe_relpath("onnx/model.onnx", context="t") == "onnx/model.onnx"


def test_atomic_write_and_relative_links(tmp_path):
    layout = HubCacheLayout(tmp_path, "model", "org/name")
    blob = layout.final_path("abc", "x")
    atomic_write(blob, b"data")
    layout.link_file("c" * 40, "sub/dir/file.bin", "abc")
    link = layout.snapshot_dir("c" * 40) / "sub/dir/file.bin"
    assert os.readlink(link) == "../../../../blobs/abc"
    assert link.read_bytes() == b"data"
    assert not [p for p in blob.parent.iterdir() if p.name.startswith(".")]  # no temp left behind
    relative_symlink(blob, link)  # idempotent
    assert layout.root.name == "models--org--name"


# -- lease -----------------------------------------------------------------------------------------
def test_lease_is_exclusive_and_released(tmp_path):
    a, b = Lease(tmp_path / "l"), Lease(tmp_path / "l")
    assert a.try_create() and not b.try_create()
    assert a.owned() and not b.owned()
    a.release()
    assert b.try_create()


def test_stale_lease_is_detected_by_content_not_clock(tmp_path):
    now = {"t": 0.0}
    holder = Lease(tmp_path / "l", ttl=10)
    assert holder.try_create()
    watch = LeaseWatch(tmp_path / "l", ttl=10, clock=lambda: now["t"])
    assert watch.poll()[0] == "held"
    now["t"] = 5
    atomic_write(tmp_path / "l", holder._content())  # a heartbeat: content changed
    assert watch.poll()[0] == "held"
    now["t"] = 14
    assert watch.poll()[0] == "held"  # only 9 s since the last change
    now["t"] = 16
    state, info = watch.poll()
    assert state == "stale"
    taker = Lease(tmp_path / "l", ttl=10)
    assert taker.take_over(info, confirm_delay=0)
    assert taker.owned() and not holder.owned()


def test_takeover_refused_when_holder_beat_meanwhile(tmp_path):
    holder = Lease(tmp_path / "l", ttl=10)
    holder.try_create()
    watch = LeaseWatch(tmp_path / "l", ttl=0, clock=iter([0, 0, 5]).__next__)
    watch.poll()
    state, info = watch.poll()
    atomic_write(tmp_path / "l", holder._content())
    assert not Lease(tmp_path / "l").take_over(info, confirm_delay=0)
    assert holder.owned()


# -- globs, sources, settings -------------------------------------------------------------------
FILES = [RemoteFile("config.json", 1, "a"), RemoteFile("model.safetensors", 1, "b"), RemoteFile("onnx/model.onnx", 1, "c")]


def test_globs_follow_hf_rules():
    assert [f.path for f in apply_globs(FILES, ("*.json", "onnx/"), (), "t")] == ["config.json", "onnx/model.onnx"]
    assert [f.path for f in apply_globs(FILES, (), ("*.onnx",), "t")] == ["config.json", "model.safetensors"]
    with pytest.raises(InvalidInput, match="matches no file"):
        apply_globs(FILES, ("*.gguf",), (), "t")


@pytest.mark.parametrize("text,repo,kind,rev", [
    ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B", "model", None),
    ("hf://Qwen/Qwen3-0.6B@v1.0", "Qwen/Qwen3-0.6B", "model", "v1.0"),
    ("hf://datasets/org/data", "org/data", "dataset", None),
    ("gpt2", "gpt2", "model", None),
])
def test_parse_hub_sources(text, repo, kind, rev):
    ref = parse_source(text)
    assert (ref.scheme, ref.repo_id, ref.repo_type, ref.revision) == ("hf", repo, kind, rev)


@pytest.mark.parametrize("bad", ["org/na me", "org//name", "org/na--me", "../etc", "a/b/c", "ftp://x/y", "hf://org/name@../x"])
def test_parse_rejects_malformed(bad):
    with pytest.raises(InvalidInput):
        parse_source(bad)


def test_settings_precedence_and_env(tmp_path):
    env = {"HF_HOME": str(tmp_path / "home"), "MODEL_AGENT_WORKERS": "3", "HF_TOKEN": "hf_secret_from_env",
           "HF_ENDPOINT": "http://mirror:8080/"}
    s = build_settings({"workers": None}, env)
    assert s.cache_dir == tmp_path / "home" / "hub" and s.workers == 3
    assert s.token == "hf_secret_from_env" and s.hf_endpoint == "http://mirror:8080"
    assert "hf_secret" not in repr(s)
    token_file = tmp_path / "tok"
    token_file.write_text("hf_from_file\n")
    s = build_settings({"workers": 5, "token_file": str(token_file), "cache_dir": str(tmp_path / "c")},
                       {**env, "HF_HUB_CACHE": "/elsewhere"})
    assert s.workers == 5 and s.token == "hf_from_file" and s.cache_dir == tmp_path / "c"
    assert build_settings({}, {"HF_HUB_CACHE": "/x"}).cache_dir == Path("/x")
    with pytest.raises(InvalidInput):
        build_settings({"engine": "fast"}, {})


def test_durations_and_sizes():
    assert parse_duration("10m", what="t") == 600 and parse_duration("1.5h", what="t") == 5400
    assert parse_size("500Gi", what="t") == 500 * 2**30 and parse_size("10GB", what="t") == 10**10
    with pytest.raises(InvalidInput):
        parse_size("lots", what="t")


def test_resume_record_maps_onto_another_range_size():
    from agent.resume import Grid, regrid

    assert regrid(Grid(30, 30), 10, [10, 4, 10]) == [14]
    assert regrid(Grid(5, 30), 10, [10, 4, 10]) == [5, 5, 4, 0, 5, 5]


def test_a_crc_from_the_store_replaces_the_md5_and_is_checked():
    import zlib

    from agent import checksums

    data = os.urandom(100_000)
    crc, md5 = f"{zlib.crc32(data):08x}", __import__("hashlib").md5(data).hexdigest()
    assert checksums.chosen({"md5": md5, "crc32": crc}) == {"crc32": crc}  # the cheaper one alone
    assert checksums.chosen({"md5": md5}) == {"md5": md5}
    good = checksums.Digests(len(data), {"md5": md5, "crc32": crc})
    good.update(data)
    assert good.problems() == []
    bad = checksums.Digests(len(data), {"md5": md5, "crc32": crc})
    bad.update(data[:-1] + b"\0")
    assert bad.problems() and bad.problems()[0].startswith("crc32")


def test_folders_are_made_before_any_thread_renames_into_them(tmp_path):
    """The mkdir-once cache must not let a second thread through before the folder exists."""
    import threading

    from agent.transfer import Transfer

    for attempt in range(20):
        t = Transfer(None, None, workers=8, chunk_size=1, policy=RetryPolicy(1, 0.0))
        folder = tmp_path.joinpath(str(attempt), *["deep"] * 60)  # many levels: a long mkdir
        barrier, missing = threading.Barrier(8), []

        def make():
            barrier.wait()
            t._ensure_dir(folder)
            if not folder.is_dir():
                missing.append(folder)

        threads = [threading.Thread(target=make) for _ in range(8)]
        [th.start() for th in threads]
        [th.join() for th in threads]
        assert not missing


def test_ranges_of_large_files_are_dealt_out_in_turns():
    from agent.transfer import interleave

    # Concurrent pwrites into one ext4 file queue on its inode lock (measured: 4 x 600 MiB written
    # by 8 threads took 0.76-6.4 s file after file, 0.48-0.67 s in turns).
    assert interleave([["a0", "a1", "a2"], ["b0"], ["c0", "c1"]]) == ["a0", "b0", "c0", "a1", "c1", "a2"]
    assert interleave([]) == []


def test_partials_of_other_content_are_swept_by_age_or_at_once_for_object_stores(tmp_path):
    import time as _time

    from agent.pipeline import PARTIAL_TTL, sweep_partials

    def make(name: str, age: float) -> Path:
        p = tmp_path / name
        p.write_bytes(b"x")
        os.utime(p, (_time.time() - age, _time.time() - age))
        return p

    done = make("aaa.ma-1-x.incomplete", 0)
    old = make("bbb.ma-2-y.incomplete", PARTIAL_TTL + 60)
    old_record = make("bbb.ma-2-y.incomplete.json", PARTIAL_TTL + 60)
    fresh = make("ccc.ma-3-z.incomplete", 60)  # another Hub revision's, maybe pulled again soon
    blob = make("ddd", PARTIAL_TTL * 2)  # not a partial: never touched
    assert sweep_partials(tmp_path, {"aaa"}, keep_others_for=PARTIAL_TTL) == 3
    assert not done.exists() and not old.exists() and not old_record.exists()
    assert fresh.exists() and blob.exists()
    assert sweep_partials(tmp_path, set(), keep_others_for=0) == 1  # a bucket's old state never returns
    assert not fresh.exists() and blob.exists()


def test_lockfile_json_carries_every_field_and_the_file_records():
    from dataclasses import fields

    from agent.lockfile import SCHEMA, Lock, LockedFile

    lock = Lock(source="s3://b/p/", revision="main", commit="a" * 40, engine="http", include=("*.json",),
                files=(LockedFile("x.bin", 3, None, "e", {"checksum_crc32": "0a0b0c0d", "part_size": 8}),))
    out = lock.to_json()
    assert set(out) == {"schema"} | {f.name for f in fields(Lock)} and out["schema"] == SCHEMA
    assert out["files"] == [{"path": "x.bin", "size": 3, "etag": "e", "checksum_crc32": "0a0b0c0d", "part_size": 8}]
    assert out["include"] == ["*.json"] and out["exclude"] == []
    assert __import__("json").loads(__import__("json").dumps(out)) == out
