"""Build the container image from ./Dockerfile and run it the way the download Job does.

Opt-in (MODEL_AGENT_BUILD_IMAGE=1): it needs root, buildah and debootstrap (Debian packages), PyPI
and Debian's mirror, and a few minutes the first time. There is no Docker engine and no registry
here, so:

- the base image is made offline-style: debootstrap a minimal Debian with python3 + venv into
  /var/tmp/model-agent-image/rootfs (kept between runs), `buildah from scratch` + copy, committed as
  localhost/model-agent-base:bookworm, and passed as BASE_IMAGE (the Dockerfile's default is
  python:3.12-slim-bookworm, the same shape: Debian, python3, venv). The host's CA bundle goes in
  too, so pip works behind a TLS-intercepting proxy;
- `buildah bud --isolation chroot` builds the Dockerfile unchanged;
- the image's root filesystem is mounted read-only in a private mount namespace, with a tmpfs on
  /tmp (the emptyDir), a local directory on /cache (the PVC) and the token on
  /var/run/secrets/huggingface, and the Job's own args and env (from the rendered manifest) run
  under `chroot --userspec=65532:65532`, against the project's Hub server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import TOKEN
from test_k8s import IMAGE_UID, KUSTOMIZATIONS, container, env_of, flag, kustomize, one

import yaml

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("MODEL_AGENT_IMAGE_WORKDIR", "/var/tmp/model-agent-image"))
BASE = "localhost/model-agent-base:bookworm"
IMAGE = "localhost/model-agent:test"
BUILDAH_ENV = {**os.environ, "STORAGE_DRIVER": os.environ.get("STORAGE_DRIVER", "vfs")}  # vfs works nested

pytestmark = [
    pytest.mark.skipif(os.environ.get("MODEL_AGENT_BUILD_IMAGE") != "1",
                       reason="opt-in: set MODEL_AGENT_BUILD_IMAGE=1 to build and run the image (minutes, root)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="building with buildah --isolation chroot needs root"),
    pytest.mark.skipif(not (shutil.which("buildah") and shutil.which("debootstrap") and shutil.which("unshare")),
                       reason="needs buildah, debootstrap (apt-get install buildah debootstrap) and unshare"),
    pytest.mark.timeout(1800),
]


def buildah(*args: str, timeout: float = 900) -> str:
    proc = subprocess.run(["buildah", *args], env=BUILDAH_ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"buildah {' '.join(args)}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout.strip()


def has_image(name: str) -> bool:
    return subprocess.run(["buildah", "inspect", "--type", "image", name], env=BUILDAH_ENV,
                          capture_output=True).returncode == 0


def make_base() -> None:
    if has_image(BASE):
        return
    rootfs = WORK / "rootfs"
    if not (rootfs / "usr/bin/python3").exists():
        shutil.rmtree(rootfs, ignore_errors=True)
        WORK.mkdir(parents=True, exist_ok=True)
        subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                        "bookworm", str(rootfs), "http://deb.debian.org/debian"], check=True, capture_output=True,
                       timeout=1200)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (rootfs / junk).glob("*"):
                if p.is_file():
                    p.unlink()
    host_ca = Path("/etc/ssl/certs/ca-certificates.crt")
    if host_ca.exists():
        shutil.copyfile(host_ca, rootfs / "etc/ssl/certs/ca-certificates.crt")
    ctr = buildah("from", "scratch")
    try:
        buildah("copy", ctr, str(rootfs), "/")
        buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--env", "LANG=C.UTF-8", "--cmd", "python3", ctr)
        buildah("commit", ctr, BASE)
    finally:
        buildah("rm", ctr)


@pytest.fixture(scope="module")
def image():
    make_base()
    buildah("bud", "--isolation", "chroot", "--pull-never", "--build-arg", f"BASE_IMAGE={BASE}", "-t", IMAGE,
            str(ROOT), timeout=1500)
    return json.loads(buildah("inspect", "--type", "image", IMAGE))


@pytest.fixture(scope="module")
def rootfs(image):
    ctr = buildah("from", "--pull-never", IMAGE)
    path = Path(buildah("mount", ctr))
    yield path
    buildah("umount", ctr)
    buildah("rm", ctr)


def test_image_config(image):
    config = image["OCIv1"]["config"]
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert config["Entrypoint"] == ["model-agent"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["HOME"] == "/tmp" and env["TMPDIR"] == "/tmp" and env["HF_HOME"] == "/cache/huggingface"
    assert not any("TOKEN" in k for k in env), env


def test_image_holds_the_venv_and_nothing_of_the_build(rootfs):
    assert (rootfs / "opt/venv/bin/model-agent").exists()
    assert not (rootfs / "src").exists(), "the builder's source tree leaked into the runtime stage"
    venv_owners = {p.stat().st_uid for p in (rootfs / "opt/venv").rglob("*") if not p.is_symlink()}
    assert venv_owners == {0}, "the runtime user must not be able to change its own code"
    leaked = [p for p in rootfs.rglob("*") if p.suffix in (".safetensors", ".gguf") or p.name == "token"]
    assert not leaked, leaked


def in_root(root: Path, path: str, depth: int = 0) -> Path:
    """`path` as the container sees it, resolved under `root` without ever leaving it: the image's
    /var/run is a symlink to /run, and following that on the host would touch the host's /run."""
    assert depth < 20, f"symlink loop at {path}"
    cur = root
    for part in Path(path).parts[1:]:
        nxt = cur / part
        if nxt.is_symlink():
            target = os.readlink(nxt)
            inside = target if target.startswith("/") else os.path.join("/", str(cur.relative_to(root)), target)
            nxt = in_root(root, os.path.normpath(inside), depth + 1)
        cur = nxt
    assert cur == root or cur.is_relative_to(root)
    return cur


def test_image_runs_the_job_read_only_as_65532(rootfs, hub, demo_files, tmp_path):
    docs = [d for d in yaml.safe_load_all(kustomize(KUSTOMIZATIONS["rwx-pvc"])) if d]
    agent = container(one(docs, "Job"), "agent")
    repo, pinned = agent["args"][1], flag(agent["args"], "--revision")
    commit = hub.add_repo(repo, demo_files, gated=True)

    cache, secret = tmp_path / "pvc", tmp_path / "secret"
    cache.mkdir()
    secret.mkdir()
    os.chown(cache, IMAGE_UID, IMAGE_UID)  # what fsGroup / the NFS export's owner gives the pod
    (secret / "token").write_text(TOKEN)
    os.chown(secret / "token", 0, IMAGE_UID)
    (secret / "token").chmod(0o440)
    tmp_path.chmod(0o755)

    mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
    local = {"model-cache": cache, "hf-token": secret}
    args = [commit if a == pinned else a for a in agent["args"]]
    args[args.index("--pushgateway") + 1] = "http://127.0.0.1:9"  # nothing listens: must not fail the pull
    image_env = json.loads(buildah("inspect", "--type", "image", IMAGE))["OCIv1"]["config"]["Env"]
    env = [*image_env, *(f"{k}={v}" for k, v in env_of(agent).items()), f"HF_ENDPOINT={hub.url}"]

    r = shlex.quote(str(rootfs))
    lines = ["set -e"]
    for path in mounts:  # the runtime creates mount points before the root goes read-only
        lines.append(f"mkdir -p {shlex.quote(str(in_root(rootfs, path)))}")
    lines += [f"mount --bind {r} {r}", f"mount -o remount,bind,ro {r}",
              f"mount --rbind /dev {r}/dev", f"mount --rbind /proc {r}/proc"]
    for path, name in mounts.items():
        target = shlex.quote(str(in_root(rootfs, path)))
        if name == "tmp":
            lines.append(f"mount -t tmpfs -o size=64m,mode=1777 tmpfs {target}")
        else:
            lines.append(f"mount --bind {shlex.quote(str(local[name]))} {target}")
    # even root cannot write there now: the probe proves the root filesystem really is read-only
    lines.append(f"if chroot {r} /usr/bin/touch /probe 2>/dev/null; "
                 "then echo 'root filesystem is writable' >&2; exit 99; fi")
    cmd = ["chroot", f"--userspec={IMAGE_UID}:{IMAGE_UID}", str(rootfs), "/usr/bin/env", "-i", *env,
           "model-agent", *args]
    lines.append("exec " + shlex.join(cmd))
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(lines)],
                          cwd="/", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    root = cache / "huggingface" / "hub" / ("models--" + repo.replace("/", "--"))
    assert (root / ".model-agent" / f"{commit}.ready").exists()
    assert {p.stat().st_uid for p in cache.rglob("*") if not p.is_symlink()} == {IMAGE_UID}
