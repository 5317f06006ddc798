"""What a person sees: `model-agent demo` on a real terminal (a pty, 120x40), read back as a SCREEN.

The bytes alone cannot tell a clean screen from a garbled one (a bar redrawn with carriage returns
and cursor moves looks fine in a byte log); a terminal emulator (pyte) replays them the way a
terminal would, and the test reads the lines a person would read.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pyte

COLS, ROWS = 120, 40
BAR = re.compile(r"[━╸╺]{3,}")  # rich's bar glyphs
LOG_WORDS = ("embedded Hub", "pulling", "resolved", "engine", "done", "Snapshot", "Ready marker")


def _run_on_pty(argv: list[str], cwd, env: dict) -> bytes:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the pty
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=10)
    os.close(master)
    assert proc.returncode == 0, out.decode(errors="replace")
    return bytes(out)


def _screen(data: bytes) -> list[str]:
    screen = pyte.Screen(COLS, ROWS)
    stream = pyte.ByteStream(screen)
    stream.feed(data)  # the pty already turned "\n" into "\r\n", as a terminal sees it
    return [line.rstrip() for line in screen.display]


def test_demo_screen_never_mixes_a_bar_and_a_log_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_AGENT_", "HF_"))}
    env.update(TERM="xterm-256color", COLUMNS=str(COLS), LINES=str(ROWS), HF_HOME=str(tmp_path / "hf"))
    data = _run_on_pty([sys.executable, "-m", "agent", "demo"], tmp_path, env)
    lines = _screen(data)
    text = "\n".join(lines)
    assert any(BAR.search(line) for line in lines), f"no progress bar on the screen:\n{text}"
    mixed = [line for line in lines if BAR.search(line) and any(w in line for w in LOG_WORDS)]
    assert not mixed, f"a screen line holds both a bar and a log message:\n{text}"
    # the log lines are on the screen, each at the left edge of a line of its own
    for words in ("embedded Hub", "Snapshot ready"):
        assert any(line.startswith(words) for line in lines), text
