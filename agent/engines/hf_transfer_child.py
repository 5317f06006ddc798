"""One hf_transfer download, in a process of its own: `python -m agent.engines.hf_transfer_child <dest>`.

hf_transfer's `download` holds the GIL until the whole file is in, so in the agent's process it
stops every other thread (lease heartbeat, /healthz, signal handling, an embedded Hub). Here it
starves nothing. The job (URL, headers with the token, the descriptor to write through) comes as
one JSON line on stdin, never on the command line, where `ps` would show it; <dest> is only a
label. Stdout carries one line per landed chunk, `+<bytes>`, then `ok`, or `error <ExceptionType>`
(its message names the URL, a credential: the parent asks the URL itself why it failed).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """A SIGKILLed agent must not leave an orphan downloading on (Linux; elsewhere best effort)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def report(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def on_chunk(n: int) -> None:
    # hf_transfer 0.1.x reports each chunk as `stop - start` of its inclusive Range, one byte short.
    report(f"+{n + 1}")


def main(argv: list[str]) -> int:
    job = json.loads(sys.stdin.readline())
    die_with_parent(job["parent_pid"])
    del argv  # the destination's name, for `ps`: the bytes go through the inherited descriptor
    dest = f"/dev/fd/{job['fd']}"
    try:
        import hf_transfer

        hf_transfer.download(url=job["url"], filename=dest, max_files=job["max_files"], chunk_size=job["chunk_size"],
                             parallel_failures=job["parallel_failures"], max_retries=job["max_retries"],
                             headers=job["headers"], callback=on_chunk)
    except Exception as exc:  # noqa: BLE001 - hf_transfer raises plain exceptions; the parent maps them
        report(f"error {type(exc).__name__}")
        return 1
    report("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
