"""devhub: a Hugging Face Hub-compatible HTTP server of our own.

Used by the test suite, by `model-agent demo` (in-process, loopback only) and by the
benchmarks. Real `huggingface_hub` clients work against it with `endpoint=srv.url` /
`HF_ENDPOINT=srv.url`.

    with HubServer(tmp_path) as srv:
        sha = srv.add_repo("org/name", make_demo_model(tmp_path / "src"))
        snapshot_download("org/name", endpoint=srv.url, cache_dir=tmp_path / "cache")
"""

from .faults import Fault, FaultSet
from .fixtures import make_demo_model, make_model, safetensors_header
from .server import HubServer
from .stats import RequestRecord, Stats

__all__ = [
    "Fault",
    "FaultSet",
    "HubServer",
    "RequestRecord",
    "Stats",
    "make_demo_model",
    "make_model",
    "safetensors_header",
]
