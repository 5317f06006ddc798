"""Settings, read once from flags and the environment, frozen, then passed down.

Nothing else in the agent reads `os.environ`: the CLI hands a copy of it to `build_settings`,
which applies the precedence flag > MODEL_AGENT_<OPTION> > the standard HF_* variables > default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import InvalidInput
from .token import Credential, TokenFile

DEFAULT_ENDPOINT = "https://huggingface.co"
ENGINES = ("auto", "xet", "hf_transfer", "http")
FILE_DEFAULTS = ("engine", "workers")  # options a models file may set for all its models


def parse_duration(text: str | float | int, *, what: str) -> float:
    """`90`, `90s`, `10m`, `1h`, `1.5h` -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", str(text))
    if not m:
        raise InvalidInput(f"{what}: {text!r} is not a duration (try 60s, 10m, 1h)")
    scale = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    return float(m.group(1)) * scale


_SIZE_UNITS = {
    "": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20,
    "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40,
}


def parse_size(text: str | int, *, what: str) -> int:
    """`1048576`, `512Mi`, `500Gi`, `1.5TB` -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _SIZE_UNITS:
        raise InvalidInput(f"{what}: {text!r} is not a size (try 500Gi, 10GB, 1048576)")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def expand(value: str, env: Mapping[str, str]) -> Path:
    """`~` and `$VAR` / `${VAR}` as huggingface_hub expands them (expanduser, then expandvars), from
    the environment the agent was given; an unknown variable is left as written, like expandvars."""
    if value == "~" or value.startswith("~/"):
        value = env.get("HOME", "~") + value[1:]
    value = re.sub(r"\$(\w+|\{[^}]*\})", lambda m: env.get(m.group(1).strip("{}"), m.group(0)), value)
    return Path(value)


def hf_home(env: Mapping[str, str]) -> Path:
    if env.get("HF_HOME"):
        return expand(env["HF_HOME"], env)
    return expand(env.get("XDG_CACHE_HOME") or "~/.cache", env) / "huggingface"


def default_cache_dir(env: Mapping[str, str]) -> tuple[Path, str]:
    """The hub cache huggingface_hub 2.4 uses in this environment, and the variable that decided it."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):  # the second is the legacy name
        if env.get(name):
            return expand(env[name], env), name
    for name in ("HF_HOME", "XDG_CACHE_HOME"):
        if env.get(name):
            return hf_home(env) / "hub", name
    return hf_home(env) / "hub", "default"


def read_token(token_file: str | None, env: Mapping[str, str]) -> Credential:
    """--token-file, else HF_TOKEN (or the legacy HUGGING_FACE_HUB_TOKEN), else the file HF_TOKEN_PATH
    names, else HF_HOME/token. A HF_TOKEN_PATH that does not exist means anonymous, as in
    huggingface_hub: it is not replaced by HF_HOME/token. A missing --token-file is an error."""
    if token_file:
        return TokenFile(expand(token_file, env), required=True, what="--token-file")
    from_env = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN")
    if from_env:
        return Credential(from_env.strip() or None)
    if env.get("HF_TOKEN_PATH"):
        return TokenFile(expand(env["HF_TOKEN_PATH"], env), required=False, what="HF_TOKEN_PATH")
    return TokenFile(hf_home(env) / "token", required=False, what="HF_HOME token")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    cache_dir: Path
    # Precedence: --cache-dir / MODEL_AGENT_CACHE_DIR, then a models file's cache_dir, then the HF_*
    # variables (an image's HF_HOME is a default, not a decision about this models file).
    cache_dir_explicit: bool = False  # from --cache-dir or MODEL_AGENT_CACHE_DIR
    cache_dir_from: str = "default"  # what decided cache_dir: the flag, the variable, or "default"
    explicit: frozenset[str] = frozenset()  # of FILE_DEFAULTS, those a flag or MODEL_AGENT_* set: they win too
    local_dir: Path | None = None
    repo_id: str | None = None
    revision: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    engine: str = "auto"
    workers: int = 8
    stall_timeout: float = 60.0
    hf_endpoint: str = DEFAULT_ENDPOINT
    endpoint_url: str | None = None
    credential: Credential = field(default_factory=lambda: Credential(None), repr=False, compare=False)
    # Azure Blob: the SDK reads none of these itself (boto3 and google-auth read their own env).
    azure_account: str | None = None
    azure_connection_string: str | None = field(default=None, repr=False)
    azure_account_key: str | None = field(default=None, repr=False)
    azure_sas_token: str | None = field(default=None, repr=False)
    # --endpoint-url given for an az:// source: the blob service URL (sovereign clouds, Azure Stack,
    # Azurite). Only the flag or MODEL_AGENT_ENDPOINT_URL: AWS_ENDPOINT_URL is for S3 alone.
    azure_endpoint: str | None = None
    # Registries (oci://): a docker config file given explicitly, plain HTTP only when asked, and the
    # variables the docker config search reads (REGISTRY_AUTH_FILE, DOCKER_CONFIG, HOME), read once here.
    registry_auth_file: str | None = None
    plain_http: bool = False
    registry_env: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    registry_ca_bundle: str | None = None  # SSL_CERT_FILE: a private registry's CA
    offline: bool = False
    xet_disabled: bool = False  # HF_HUB_DISABLE_XET: `auto` never picks hf_xet
    config: Path | None = None  # --config / MODEL_AGENT_CONFIG: the models file
    once: bool = False  # sync: one round, then exit
    max_bytes: int | None = None  # gc
    dry_run: bool = False  # gc
    overwrite: bool = False  # push: replace another model's published lockfile
    log_format: str = "auto"
    metrics_port: int | None = None
    metrics_textfile: Path | None = None
    pushgateway: str | None = None
    lock_timeout: float | None = None  # None: wait for a live writer as long as it lives
    lease_ttl: float = 60.0
    chunk_size: int = 64 * 2**20
    direct_io: str = "auto"  # O_DIRECT for large files: auto (local block file systems), on, off
    disk_margin: int = 256 * 2**20
    xet_high_performance: bool = False
    # The memory a pull plans for (agent/memory.py): --memory-limit / MODEL_AGENT_MEMORY_LIMIT, else None
    # (the cgroup's limit, else the host's RAM, read when a transfer needs it).
    memory_limit: int | None = None
    memory_limit_from: str = "--memory-limit"
    xet_env: frozenset[str] = frozenset()  # the HF_XET_* variables set: the operator's, never overridden
    retry_max_failures: int = 8
    retry_base_delay: float = 0.5
    wait_timeout: float = 1800.0
    progress_interval: float = 10.0
    interval: float | None = None  # sync: None means the models file's `interval`
    poll_interval: float = 2.0

    @property
    def token(self) -> str | None:
        """Never printed, never logged; re-read when its file changes (agent/token.py)."""
        return self.credential.current()

    def cache_dir_for(self, file_cache_dir: Path | None) -> tuple[Path, str, list[str]]:
        """The cache a models file's models go to, what decided it, and what it overrode."""
        env_choice = [] if self.cache_dir_from == "default" else [f"{self.cache_dir_from} ({self.cache_dir})"]
        if self.cache_dir_explicit:
            overridden = [f"models file ({file_cache_dir})"] if file_cache_dir is not None else []
            return self.cache_dir, self.cache_dir_from, overridden
        if file_cache_dir is not None:
            return file_cache_dir, "models file", env_choice
        return self.cache_dir, self.cache_dir_from, []


def _revision(value: Any) -> str | None:
    """--revision names refs/<revision> on disk: refuse what git would refuse (`.`, `a..b`, `x.lock`)."""
    if value is None:
        return None
    from .sources.huggingface import check_revision

    return check_revision(str(value))


def env_option(env: Mapping[str, str], name: str) -> str | None:
    """MODEL_AGENT_<OPTION>: `--stall-timeout` reads MODEL_AGENT_STALL_TIMEOUT."""
    return env.get(env_name(name))


def env_name(name: str) -> str:
    return "MODEL_AGENT_" + name.upper().replace("-", "_")


class _Options:
    """Flag, else MODEL_AGENT_<OPTION>, else a default; each value parsed with the name it came from,
    so `MODEL_AGENT_WORKERS=eight` is exit 2 naming the variable, not an internal error."""

    def __init__(self, opts: Mapping[str, Any], env: Mapping[str, str]):
        self.opts, self.env = opts, env

    def source(self, name: str) -> str:
        value = self.opts.get(name)
        given = value is not None and value != [] and value != ()
        return "--" + name.replace("_", "-") if given else env_name(name)

    def get(self, name: str, default: Any = None) -> Any:
        value = self.opts.get(name)
        if value is None or value == [] or value == ():
            value = env_option(self.env, name)
        return default if value is None else value

    def integer(self, name: str, default: int | None, low: int = 0, high: int = 2**31) -> int | None:
        value = self.get(name, default)
        if value is None:
            return None
        try:
            number = int(str(value).strip())
        except ValueError:
            raise InvalidInput(f"{self.source(name)} {value!r}: expected a whole number") from None
        if not low <= number <= high:
            raise InvalidInput(f"{self.source(name)} {number}: expected {low}..{high}")
        return number

    def duration(self, name: str, default: Any = None, *, positive: bool = False) -> float | None:
        value = self.get(name, default)
        if value is None:
            return None
        seconds = parse_duration(value, what=self.source(name))
        if positive and seconds <= 0:
            raise InvalidInput(f"{self.source(name)} {value!r}: must be more than 0")
        return seconds

    def flag(self, name: str) -> bool:
        value = self.get(name, False)
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
            raise InvalidInput(f"{self.source(name)} {value!r}: expected 1/true/yes/on or 0/false/no/off")
        return _truthy(text)

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = str(self.get(name, default))
        if value not in allowed:
            raise InvalidInput(f"{self.source(name)} {value!r}: expected one of {', '.join(allowed)}")
        return value

    def globs(self, name: str) -> tuple[str, ...]:
        value = self.get(name, ())
        if isinstance(value, str):  # from the environment: comma-separated
            value = [v for v in value.split(",") if v.strip()]
        return tuple(v.strip() for v in value)


def _cache_dir(o: _Options, env: Mapping[str, str]) -> dict[str, Any]:
    given = o.get("cache_dir")
    if given:
        return dict(cache_dir=expand(str(given), env), cache_dir_explicit=True, cache_dir_from=o.source("cache_dir"))
    path, decided_by = default_cache_dir(env)
    return dict(cache_dir=path, cache_dir_explicit=False, cache_dir_from=decided_by)


def _hub_environment(env: Mapping[str, str]) -> dict[str, Any]:
    """The HF_* switches, read as huggingface_hub reads them."""
    return dict(
        offline=_truthy(env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE")),
        xet_disabled=_truthy(env.get("HF_HUB_DISABLE_XET")),
        hf_endpoint=str(env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
        azure_account=env.get("AZURE_STORAGE_ACCOUNT") or None,
        azure_connection_string=env.get("AZURE_STORAGE_CONNECTION_STRING") or None,
        azure_account_key=env.get("AZURE_STORAGE_KEY") or None,
        azure_sas_token=env.get("AZURE_STORAGE_SAS_TOKEN") or None,
        registry_env=tuple((k, env[k]) for k in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "HOME", "PATH") if env.get(k)),
        registry_ca_bundle=env.get("SSL_CERT_FILE") or None,
    )


def _commands(o: _Options) -> dict[str, Any]:
    """Options of one command (sync's --once, gc's --max-bytes and --dry-run, the models file)."""
    config, max_bytes = o.get("config"), o.get("max_bytes")
    return dict(
        config=Path(str(config)) if config else None,
        once=o.flag("once"),
        dry_run=o.flag("dry_run"),
        overwrite=o.flag("overwrite"),
        plain_http=o.flag("plain_http"),
        registry_auth_file=str(o.get("registry_auth_file")) if o.get("registry_auth_file") else None,
        max_bytes=parse_size(max_bytes, what=o.source("max_bytes")) if max_bytes is not None else None,
    )


def _memory(o: _Options, env: Mapping[str, str]) -> dict[str, Any]:
    given = o.get("memory_limit")
    limit = parse_size(given, what=o.source("memory_limit")) if given is not None else None
    if limit is not None and limit <= 0:
        raise InvalidInput(f"{o.source('memory_limit')} {given!r}: must be more than 0")
    return dict(memory_limit=limit, memory_limit_from=o.source("memory_limit"),
                xet_env=frozenset(name for name, value in env.items() if name.startswith("HF_XET_") and value))


def build_settings(opts: Mapping[str, Any], env: Mapping[str, str]) -> Settings:
    """Merge parsed flags (None when not given) with the environment, validate, freeze."""
    o = _Options(opts, env)
    log_format = o.choice("log_format", "auto", ("auto", "text", "json"))
    local_dir, textfile = o.get("local_dir"), o.get("metrics_textfile")
    hub = _hub_environment(env)
    if o.get("hf_endpoint"):
        hub["hf_endpoint"] = str(o.get("hf_endpoint")).rstrip("/")
    return Settings(
        **_cache_dir(o, env),
        **hub,
        **_commands(o),
        explicit=frozenset(name for name in FILE_DEFAULTS if o.get(name) is not None),
        interval=o.duration("interval", positive=True),
        local_dir=Path(local_dir).expanduser().absolute() if local_dir else None,
        repo_id=o.get("repo_id"),
        revision=_revision(o.get("revision")),
        include=o.globs("include"),
        exclude=o.globs("exclude"),
        engine=o.choice("engine", "auto", ENGINES),
        workers=o.integer("workers", 8, 1, 256),
        stall_timeout=o.duration("stall_timeout", 60, positive=True),
        endpoint_url=o.get("endpoint_url") or env.get("AWS_ENDPOINT_URL"),
        credential=read_token(o.get("token_file"), env),
        azure_endpoint=o.get("endpoint_url"),
        log_format=log_format,
        metrics_port=o.integer("metrics_port", None, 0, 65535),
        metrics_textfile=Path(textfile) if textfile else None,
        pushgateway=o.get("pushgateway"),
        lock_timeout=o.duration("lock_timeout"),
        lease_ttl=o.duration("lease_ttl", 60, positive=True),
        chunk_size=parse_size(o.get("chunk_size", "64Mi"), what=o.source("chunk_size")),
        direct_io=o.choice("direct_io", "auto", ("auto", "on", "off")),
        disk_margin=parse_size(o.get("disk_margin", "256Mi"), what=o.source("disk_margin")),
        xet_high_performance=_truthy(env.get("HF_XET_HIGH_PERFORMANCE") or env.get("HF_XET_HP"))
        or bool(opts.get("xet_high_performance")),
        **_memory(o, env),
        retry_max_failures=o.integer("retry_max_failures", 8, 1),
        retry_base_delay=float(o.get("retry_base_delay", 0.5)),
        wait_timeout=o.duration("timeout", "30m"),
        poll_interval=o.duration("poll_interval", "2s", positive=True),
        progress_interval=o.duration("progress_interval", "10s", positive=True),
    )
