"""Model repos to serve: a small demo model and large generated ones for benchmarks.

Everything is deterministic for a given seed (same bytes, same hashes on every run) and
written in 8 MiB pieces so generating a multi-GB model keeps memory flat.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

PIECE = 8 * 1024 * 1024
_DTYPE_SIZE = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1}


def safetensors_header(
    tensors: list[tuple[str, str, list[int]]], metadata: dict | None = None
) -> tuple[bytes, int]:
    """(8-byte little-endian length + JSON header, size of the data section) for `tensors`."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in tensors:
        n = _DTYPE_SIZE[dtype]
        for dim in shape:
            n *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header with spaces to 8-byte alignment
    return struct.pack("<Q", len(raw)) + raw, offset


def _small_floats(rng: random.Random, n_bytes: int, dtype: str) -> bytes:
    """Random tensor bytes that decode to small finite floats (no NaN/inf surprises)."""
    data = bytearray(rng.randbytes(n_bytes))
    width = _DTYPE_SIZE[dtype]
    if width > 1:
        # the top byte of each little-endian element holds sign + exponent: pin the exponent
        high = 0x3C if dtype == "F32" else (0x2C if dtype == "F16" else 0x3C)
        table = bytes(high | (b & 0x80) for b in range(256))
        data[width - 1 :: width] = bytes(data[width - 1 :: width]).translate(table)
    return bytes(data)


def _write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


def _tokenizer(vocab_size: int) -> dict:
    """A valid `tokenizers` WordLevel tokenizer, small but real enough to load."""
    special = ["<unk>", "<s>", "</s>"]
    words = special + [f"tok{i}" for i in range(vocab_size - len(special))]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(special)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
        "decoder": None, "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(words)},
                                   "unk_token": "<unk>"},
    }


def make_demo_model(dest_dir: Path) -> dict[str, Path]:
    """A tiny llama-shaped model (~4 MB): configs, tokenizer, valid safetensors, nested file."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    hidden, vocab = 512, 1024
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": 2 * hidden, "num_hidden_layers": 1, "num_attention_heads": 8,
        "num_key_value_heads": 8, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2,
    }
    tokenizer_config = {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": 2048, "tokenizer_class": "PreTrainedTokenizerFast",
    }
    docs = {
        "config.json": config,
        "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2, "max_new_tokens": 32},
        "tokenizer.json": _tokenizer(vocab),
        "tokenizer_config.json": tokenizer_config,
        # a nested file, so clients must create sub-directories
        "original/params.json": {"dim": hidden, "n_layers": 1, "n_heads": 8, "vocab_size": vocab, "norm_eps": 1e-5},
    }
    files = {name: _write_json(dest / name, doc) for name, doc in docs.items()}
    readme = dest / "README.md"
    readme.write_text(
        "---\nlicense: apache-2.0\nlibrary_name: transformers\ntags:\n- demo\n---\n\n"
        "# Demo model\n\nA tiny random llama-shaped model served by the dev hub.\n"
    )
    files["README.md"] = readme
    files["model.safetensors"] = _demo_safetensors(dest / "model.safetensors", hidden, vocab)
    return files


def _demo_safetensors(path: Path, hidden: int, vocab: int) -> Path:
    tensors = [
        ("model.embed_tokens.weight", "F32", [vocab, hidden]),
        ("model.layers.0.self_attn.q_proj.weight", "F16", [hidden, hidden]),
        ("model.layers.0.self_attn.k_proj.weight", "F16", [hidden, hidden]),
        ("model.layers.0.mlp.up_proj.weight", "F16", [2 * hidden, hidden]),
        ("model.norm.weight", "F32", [hidden]),
    ]
    header, _ = safetensors_header(tensors)
    rng = random.Random(1234)
    with open(path, "wb") as f:
        f.write(header)
        for _, dtype, shape in tensors:
            n = _DTYPE_SIZE[dtype]
            for dim in shape:
                n *= dim
            f.write(_small_floats(rng, n, dtype))
    return path


def _large_header(size: int) -> bytes:
    """Header of a one-tensor U8 safetensors file whose total size is exactly `size`."""
    n = size
    for _ in range(4):  # the header length depends on the digits of n: iterate to a fixed point
        header, _ = safetensors_header([("weight", "U8", [n])])
        n = size - len(header)
    header, data = safetensors_header([("weight", "U8", [n])])
    return header if n >= 0 and len(header) + data == size else b""


def _already_written(path: Path, size: int, offset: int, first: bytes) -> bool:
    try:
        if path.stat().st_size != size:
            return False
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(len(first)) == first[: size - offset]
    except OSError:
        return False


def _write_large(path: Path, size: int, seed: int) -> Path:
    """`size` random-looking bytes; each 8 MiB piece is a distinct byte permutation of one
    random block, so nothing repeats (no accidental xet/CDN dedup) yet it costs ~1 GB/s."""
    rng = random.Random(seed)
    base = rng.randbytes(PIECE)
    header = _large_header(size)
    first = base.translate(bytes(random.Random(seed).sample(range(256), 256)))[:64]
    if _already_written(path, size, len(header), first):
        return path  # deterministic content: a complete file from an earlier run is reusable
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        left = size - len(header)
        piece_no = 0
        while left > 0:
            # piece 0 uses the seed's first permutation, so _already_written can check it
            table = bytes(random.Random(seed + piece_no * 7919).sample(range(256), 256))
            f.write(base.translate(table)[: min(left, PIECE)])
            left -= min(left, PIECE)
            piece_no += 1
    tmp.replace(path)  # only complete files ever carry the final name
    return path


def make_model(
    dest_dir: Path, *, large_files: int, large_size: int, small_files: int = 5, seed: int = 0
) -> dict[str, Path]:
    """Benchmark model: `large_files` safetensors shards of exactly `large_size` bytes each,
    plus `small_files` small JSON/text files (below the default LFS threshold)."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for i in range(large_files):
        # transformers' shard naming, so loaders that glob for shards find them
        name = f"model-{i + 1:05d}-of-{large_files:05d}.safetensors" if large_files > 1 else "model.safetensors"
        files[name] = _write_large(dest / name, large_size, seed * 1_000_003 + i)
    rng = random.Random(seed)
    names = ["config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json"]
    names.append("README.md")
    names += [f"extra/file_{i:03d}.json" for i in range(max(0, small_files - len(names)))]
    for name in names[:small_files]:
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        values = [round(rng.random(), 6) for _ in range(64)]
        if name.endswith(".md"):
            path.write_text(f"# Benchmark model (seed {seed})\n\n" + " ".join(map(str, values)) + "\n")
        else:
            path.write_text(json.dumps({"name": name, "seed": seed, "values": values}, indent=1) + "\n")
        files[name] = path
    return files
