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


def default_cache_dir(env: Mapping[str, str]) -> Path:
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return Path(env.get("HOME", "~")).expanduser() / ".cache" / "huggingface" / "hub"


def read_token(token_file: str | None, env: Mapping[str, str]) -> str | None:
    """--token-file, else HF_TOKEN, else HF_TOKEN_PATH, else the token `hf auth login` saved."""
    candidates: list[Path] = []
    if token_file:
        path = Path(token_file).expanduser()
        try:
            return path.read_text().strip() or None
        except OSError as exc:
            raise InvalidInput(f"--token-file {token_file}: cannot read it ({exc.strerror})") from None
    if env.get("HF_TOKEN"):
        return env["HF_TOKEN"].strip()
    if env.get("HF_TOKEN_PATH"):
        candidates.append(Path(env["HF_TOKEN_PATH"]).expanduser())
    home = Path(env["HF_HOME"]).expanduser() if env.get("HF_HOME") else Path(env.get("HOME", "~")).expanduser() / ".cache" / "huggingface"
    candidates.append(home / "token")
    for path in candidates:
        try:
            token = path.read_text().strip()
        except OSError:
            continue
        if token:
            return token
    return None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    cache_dir: Path
    cache_dir_explicit: bool = False  # from a flag or env var: wins over a models file's cache_dir
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
    token: str | None = field(default=None, repr=False)  # never printed, never logged
    # Azure Blob: the SDK reads none of these itself (boto3 and google-auth read their own env).
    azure_account: str | None = None
    azure_connection_string: str | None = field(default=None, repr=False)
    azure_account_key: str | None = field(default=None, repr=False)
    azure_sas_token: str | None = field(default=None, repr=False)
    # --endpoint-url given for an az:// source: the blob service URL (sovereign clouds, Azure Stack,
    # Azurite). Only the flag or MODEL_AGENT_ENDPOINT_URL: AWS_ENDPOINT_URL is for S3 alone.
    azure_endpoint: str | None = None
    offline: bool = False
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
    retry_max_failures: int = 8
    retry_base_delay: float = 0.5
    wait_timeout: float = 1800.0
    progress_interval: float = 10.0
    interval: float | None = None  # sync: None means the models file's `interval`
    poll_interval: float = 2.0


def _direct_io(value: str) -> str:
    if value not in ("auto", "on", "off"):
        raise InvalidInput(f"--direct-io {value!r}: expected auto, on or off")
    return value


def _revision(value: Any) -> str | None:
    """--revision names refs/<revision> on disk: refuse what git would refuse (`.`, `a..b`, `x.lock`)."""
    if value is None:
        return None
    from .sources.huggingface import check_revision

    return check_revision(str(value))


def env_option(env: Mapping[str, str], name: str) -> str | None:
    """MODEL_AGENT_<OPTION>: `--stall-timeout` reads MODEL_AGENT_STALL_TIMEOUT."""
    return env.get("MODEL_AGENT_" + name.upper().replace("-", "_"))


def build_settings(opts: Mapping[str, Any], env: Mapping[str, str]) -> Settings:
    """Merge parsed flags (None when not given) with the environment, validate, freeze."""

    def pick(name: str, default: Any = None) -> Any:
        value = opts.get(name)
        if value is None or value == [] or value == ():
            value = env_option(env, name)
        return default if value is None else value

    engine = str(pick("engine", "auto"))
    if engine not in ENGINES:
        raise InvalidInput(f"--engine {engine!r}: expected one of {', '.join(ENGINES)}")
    workers = int(pick("workers", 8))
    if not 1 <= workers <= 256:
        raise InvalidInput(f"--workers {workers}: expected 1..256")
    log_format = str(pick("log_format", "auto"))
    if log_format not in ("auto", "text", "json"):
        raise InvalidInput(f"--log-format {log_format!r}: expected text or json")

    def globs(name: str) -> tuple[str, ...]:
        value = pick(name, ())
        if isinstance(value, str):  # from the environment: comma-separated
            value = [v for v in value.split(",") if v.strip()]
        return tuple(v.strip() for v in value)

    cache_dir = pick("cache_dir")
    local_dir = pick("local_dir")
    textfile = pick("metrics_textfile")
    port = pick("metrics_port")
    lock_timeout = pick("lock_timeout")
    return Settings(
        cache_dir=Path(cache_dir).expanduser() if cache_dir else default_cache_dir(env),
        cache_dir_explicit=bool(cache_dir or env.get("HF_HUB_CACHE") or env.get("HF_HOME")),
        explicit=frozenset(name for name in FILE_DEFAULTS if pick(name) is not None),
        interval=parse_duration(pick("interval"), what="--interval") if pick("interval") is not None else None,
        local_dir=Path(local_dir).expanduser().absolute() if local_dir else None,
        repo_id=pick("repo_id"),
        revision=_revision(pick("revision")),
        include=globs("include"),
        exclude=globs("exclude"),
        engine=engine,
        workers=workers,
        stall_timeout=parse_duration(pick("stall_timeout", 60), what="--stall-timeout"),
        hf_endpoint=str(pick("hf_endpoint") or env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
        endpoint_url=pick("endpoint_url") or env.get("AWS_ENDPOINT_URL"),
        token=read_token(pick("token_file"), env),
        azure_account=env.get("AZURE_STORAGE_ACCOUNT") or None,
        azure_connection_string=env.get("AZURE_STORAGE_CONNECTION_STRING") or None,
        azure_account_key=env.get("AZURE_STORAGE_KEY") or None,
        azure_sas_token=env.get("AZURE_STORAGE_SAS_TOKEN") or None,
        azure_endpoint=pick("endpoint_url"),
        offline=_truthy(env.get("HF_HUB_OFFLINE")),
        log_format=log_format,
        metrics_port=int(port) if port is not None else None,
        metrics_textfile=Path(textfile) if textfile else None,
        pushgateway=pick("pushgateway"),
        lock_timeout=parse_duration(lock_timeout, what="--lock-timeout") if lock_timeout is not None else None,
        lease_ttl=parse_duration(pick("lease_ttl", 60), what="--lease-ttl"),
        chunk_size=parse_size(pick("chunk_size", "64Mi"), what="--chunk-size"),
        direct_io=_direct_io(str(pick("direct_io", "auto"))),
        disk_margin=parse_size(pick("disk_margin", "256Mi"), what="--disk-margin"),
        xet_high_performance=_truthy(env.get("HF_XET_HIGH_PERFORMANCE")) or bool(opts.get("xet_high_performance")),
        retry_max_failures=int(pick("retry_max_failures", 8)),
        retry_base_delay=float(pick("retry_base_delay", 0.5)),
        wait_timeout=parse_duration(pick("timeout", "30m"), what="--timeout"),
        poll_interval=parse_duration(pick("poll_interval", "2s"), what="--poll-interval"),
        progress_interval=parse_duration(pick("progress_interval", "10s"), what="--progress-interval"),
    )
