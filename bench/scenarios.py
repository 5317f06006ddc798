"""What gets measured: one `Case` per tool, as a command line writing into a fresh directory.

Every case writes into its own empty directory on the same filesystem as the source files, so
they all pay the same disk. Python tools are started from the venv's console scripts, exactly as
a user would run them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Case:
    key: str  # stable id in the raw JSON: agent-http, hf, copy, ...
    label: str  # row title in the table
    argv: Callable[[Path], list[str]]  # destination dir -> command line
    files_root: Callable[[Path], Path]  # destination dir -> where the model's files end up
    is_agent: bool = False


def _snapshot(dest: Path, repo: str, commit: str) -> Path:
    return dest / ("models--" + repo.replace("/", "--")) / "snapshots" / commit


def agent_case(engine: str, repo: str, commit: str) -> Case:
    def argv(dest: Path) -> list[str]:
        # --revision pinned to the commit: every tool fetches exactly the same revision
        return [str(VENV_BIN / "model-agent"), "pull", repo, "--revision", commit, "--cache-dir", str(dest),
                "--engine", engine, "--log-format", "json"]

    return Case(f"agent-{engine}", f"model-agent --engine {engine}", argv,
                lambda dest: _snapshot(dest, repo, commit), is_agent=True)


def hf_case(repo: str, commit: str) -> Case:
    def argv(dest: Path) -> list[str]:
        return [str(VENV_BIN / "hf"), "download", repo, "--revision", commit, "--cache-dir", str(dest)]

    return Case("hf", "hf download", argv, lambda dest: _snapshot(dest, repo, commit))


def copy_case(src_dir: Path) -> Case:
    # cp creates `dest` itself (it must not exist yet), so the copy lands at dest/ directly
    return Case("copy", "cp -r (local copy)", lambda dest: ["cp", "-r", str(src_dir), str(dest)], lambda dest: dest)


def http_cases(repo: str, commit: str, src_dir: Path) -> list[Case]:
    engines = ("http", "hf_transfer", "auto")
    return [*(agent_case(e, repo, commit) for e in engines), hf_case(repo, commit), copy_case(src_dir)]


def scaling_cases(repo: str, commit: str) -> list[Case]:
    return [agent_case("http", repo, commit), agent_case("hf_transfer", repo, commit), hf_case(repo, commit)]


def xet_cases(repo: str, commit: str, src_dir: Path) -> list[Case]:
    hf = hf_case(repo, commit)
    hf = Case(hf.key, "hf download (via hf_xet)", hf.argv, hf.files_root)
    return [agent_case("xet", repo, commit), hf, copy_case(src_dir)]
