"""Sources: where a snapshot comes from. Each backend is one module that registers itself."""

from .base import RemoteFile, Source, open_source, parse_source  # noqa: F401
