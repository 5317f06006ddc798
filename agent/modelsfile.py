"""The models file (`--config models.yaml`, typically a mounted ConfigMap): what the cache should hold."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import ENGINES, parse_duration, parse_size
from .errors import InvalidInput

_MODEL_KEYS = {"source", "revision", "include", "exclude", "repo_id", "pin", "engine", "local_dir"}
_TOP_KEYS = {"cache_dir", "models", "gc", "interval", "workers", "engine"}


@dataclass(frozen=True)
class ModelSpec:
    source: str
    revision: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    repo_id: str | None = None
    pin: bool = False
    engine: str | None = None  # wins over --engine: the most specific word on this model
    local_dir: Path | None = None  # flat files there instead of the cache


@dataclass(frozen=True)
class Watermark:
    """A threshold of the volume: a percent of its size, or an absolute number of bytes."""

    percent: float | None = None
    bytes: int | None = None

    def limit(self, volume_bytes: int) -> int:
        return int(volume_bytes * self.percent / 100) if self.percent is not None else int(self.bytes or 0)

    @staticmethod
    def parse(value: Any, what: str) -> "Watermark":
        text = str(value).strip()
        if text.endswith("%"):
            try:
                pct = float(text[:-1])
            except ValueError:
                raise InvalidInput(f"{what}: {value!r} is not a percentage") from None
            if not 0 < pct <= 100:
                raise InvalidInput(f"{what}: {value!r} must be between 0% and 100%")
            return Watermark(percent=pct)
        return Watermark(bytes=parse_size(text, what=what))


@dataclass(frozen=True)
class ModelsFile:
    models: tuple[ModelSpec, ...]
    cache_dir: Path | None = None
    high_watermark: Watermark = field(default_factory=lambda: Watermark(percent=90))
    low_watermark: Watermark = field(default_factory=lambda: Watermark(percent=80))
    interval: float = 600.0
    workers: int | None = None  # defaults for every model; --workers / --engine (or env) win
    engine: str | None = None

    def limits(self, cache_dir: Path) -> tuple[int, int, bool]:
        """(high, low, by_volume) in bytes: percents are of the volume, sizes of the cache."""
        by_volume = self.high_watermark.percent is not None
        total = shutil.disk_usage(cache_dir).total if by_volume else 0
        return self.high_watermark.limit(total), self.low_watermark.limit(total), by_volume


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidInput(f"{what}: expected a string or a list of strings")
    return tuple(value)


def _engine(value: Any, what: str) -> str | None:
    if value is not None and value not in ENGINES:
        raise InvalidInput(f"{what}: engine {value!r}: expected one of {', '.join(ENGINES)}")
    return value


def _workers(value: Any, what: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256):
        raise InvalidInput(f"{what}: workers {value!r}: expected a whole number 1..256")
    return value


def _local_dir(value: Any, what: str) -> Path | None:
    if value is None:
        return None
    folder = Path(str(value)).expanduser()
    if not isinstance(value, str) or not folder.is_absolute():
        raise InvalidInput(f"{what}: local_dir {value!r}: expected an absolute path")
    return folder


def _revision(value: Any, what: str) -> str | None:
    if value is None:
        return None
    from .sources.huggingface import check_revision

    try:
        return check_revision(str(value))
    except InvalidInput as exc:
        raise InvalidInput(f"{what}: {exc}") from None


def _model(entry: Any, index: int, path: Path) -> ModelSpec:
    what = f"{path}: models[{index}]"
    if isinstance(entry, str):
        return ModelSpec(source=entry)
    if not isinstance(entry, dict) or not isinstance(entry.get("source"), str):
        raise InvalidInput(f"{what}: each model needs a `source`")
    unknown = set(entry) - _MODEL_KEYS
    if unknown:
        raise InvalidInput(f"{what}: unknown key(s) {', '.join(sorted(unknown))}")
    return ModelSpec(
        source=entry["source"],
        revision=_revision(entry.get("revision"), what),
        include=_strings(entry.get("include"), f"{what}.include"),
        exclude=_strings(entry.get("exclude"), f"{what}.exclude"),
        repo_id=entry.get("repo_id"),
        pin=bool(entry.get("pin", False)),
        engine=_engine(entry.get("engine"), what),
        local_dir=_local_dir(entry.get("local_dir"), what),
    )


def load(path: Path) -> ModelsFile:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise InvalidInput(f"--config {path}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise InvalidInput(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise InvalidInput(f"--config {path}: expected a mapping with a `models` list")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise InvalidInput(f"--config {path}: unknown key(s) {', '.join(sorted(unknown))}")
    gc = data.get("gc") or {}
    if not isinstance(gc, dict):
        raise InvalidInput(f"--config {path}: `gc` must be a mapping")
    high = Watermark.parse(gc.get("high_watermark", "90%"), f"{path}: gc.high_watermark")
    low = Watermark.parse(gc.get("low_watermark", "80%"), f"{path}: gc.low_watermark")
    models = tuple(_model(e, i, path) for i, e in enumerate(data["models"]))
    from .sources.base import parse_source

    for m in models:
        parse_source(m.source)  # a bad URI fails the whole file up front, not one round later
    folders = [m.local_dir for m in models if m.local_dir is not None]
    if len(set(folders)) != len(folders):
        raise InvalidInput(f"--config {path}: two models share a local_dir: each needs its own folder")
    return ModelsFile(
        models=models,
        cache_dir=Path(data["cache_dir"]) if data.get("cache_dir") else None,
        high_watermark=high,
        low_watermark=low,
        interval=parse_duration(data.get("interval", "10m"), what=f"{path}: interval"),
        workers=_workers(data.get("workers"), str(path)),
        engine=_engine(data.get("engine"), str(path)),
    )
