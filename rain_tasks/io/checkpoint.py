"""Streaming tensor I/O: lazy reads from (sharded) safetensors checkpoints, streamed and sharded writes.

Peak memory stays at a few tensors plus one output shard: tensors are read one at a time
(positioned reads, no memory map) and written into shards that are flushed at a size limit.
Every output is written inside rain_tasks.io.artifacts.atomic_path, so a killed run never leaves a file
or model directory that looks complete.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from rain_tasks.io.arch import layer_of
from rain_tasks.io.artifacts import atomic_path
from rain_tasks.io.guards import header_length, safe_name

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

#: dtype names (params.yaml's runtime.dtype, config.json's `dtype`) -> torch dtypes
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def checkpoint_dtype(model_dir: str | Path) -> torch.dtype:
    """The dtype a checkpoint's config.json declares (`dtype` or the older `torch_dtype`; float32 if neither)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise ValueError(f"{model_dir}: unsupported dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


class Checkpoint:
    """A Hugging Face safetensors checkpoint opened as its shard index; tensors load lazily."""

    def __init__(self, model_dir: str | Path):
        self.path = Path(model_dir)
        index = self.path / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            for shard in set(weight_map.values()):
                safe_name(shard, f"{index}: shard", single=True)
        elif (self.path / SINGLE_NAME).is_file():
            weight_map = {name: SINGLE_NAME for name in TensorFile(self.path / SINGLE_NAME).keys()}
        else:
            raise FileNotFoundError(f"{self.path}: neither {INDEX_NAME} nor {SINGLE_NAME}; not a safetensors checkpoint")
        self.weight_map: dict[str, str] = dict(sorted(weight_map.items()))
        missing = sorted({s for s in self.weight_map.values() if not (self.path / s).is_file()})
        if missing:
            raise FileNotFoundError(f"{self.path}: shard(s) named in the index are missing: {missing}")
        self._handles: dict[str, TensorFile] = {}

    def names(self) -> list[str]:
        """All tensor names, sorted."""
        return list(self.weight_map)

    @property
    def shards(self) -> list[str]:
        """Shard file names, sorted."""
        return sorted(set(self.weight_map.values()))

    def _handle(self, name: str) -> TensorFile:
        try:
            shard = self.weight_map[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None
        if shard not in self._handles:
            self._handles[shard] = TensorFile(self.path / shard)
        return self._handles[shard]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (only it is materialised)."""
        return self._handle(name).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one tensor without reading its data."""
        return self._handle(name).shape(name)

    def dtype_name(self, name: str) -> str:
        """safetensors dtype string (e.g. 'BF16', 'F32') without reading the data."""
        return self._handle(name).dtype_name(name)

    def dtype(self, name: str) -> torch.dtype:
        """torch dtype of one tensor without reading the data."""
        return _TORCH_DTYPES[self.dtype_name(name)]

    def layer_names(self, layer: int) -> list[str]:
        """Tensor names of one decoder layer."""
        return [n for n in self.weight_map if layer_of(n) == layer]

    def non_layer_names(self) -> list[str]:
        """Embeddings, final norm, lm_head: tensors outside the decoder layers."""
        return [n for n in self.weight_map if layer_of(n) is None]


class Difference:
    """Δ = θ_a − θ_b of two checkpoints, computed per tensor in fp32 as it is asked for: the values the
    task_vectors stage stores, so a merge can read ITM and base instead of the fp32 Δ artifact."""

    def __init__(self, a: Checkpoint, b: Checkpoint):
        self.a, self.b = a, b

    def get(self, name: str) -> torch.Tensor:
        """θ_a − θ_b of one tensor, fp32."""
        return self.a.get(name).to(torch.float32) - self.b.get(name).to(torch.float32)


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}
#: safetensors dtype codes of floating-point tensors (the ones a value scan reads)
FLOAT_CODES = frozenset(code for dtype, code in _ST_DTYPES.items() if dtype.is_floating_point)


class TensorFile:
    """One safetensors file read a tensor at a time with positioned reads, not a memory map.

    A memory map leaves every page it touched resident in the process (a whole 15 GB checkpoint
    by the end of a merge); reading into a fresh buffer keeps only the tensors still referenced.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            n = header_length(f.read(8), self.path.stat().st_size, str(self.path))
            header = json.loads(f.read(n))
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict] = header
        self._start = 8 + n
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.path.stat().st_size < self._start + end:
            raise ValueError(f"{self.path}: truncated safetensors file ({self.path.stat().st_size} bytes, "
                             f"header promises {self._start + end}); rewrite or re-download it")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype_name(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def get_tensor(self, name: str) -> torch.Tensor:
        """Read one tensor into memory it owns."""
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        dtype = _TORCH_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{self.path}: tensor {name} is stored as {entry['dtype']}, which is not read here "
                             f"(supported: {sorted(_TORCH_DTYPES)}); convert the checkpoint to bfloat16 or float32")
        if end == begin:
            return torch.empty(entry["shape"], dtype=dtype)
        buf = torch.empty(end - begin, dtype=torch.uint8)  # not zero-filled: every byte is read into it
        view = memoryview(buf.numpy())
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._start + begin)
            done = 0
            while done < len(buf):  # a single read returns at most ~2 GiB on Linux
                got = f.readinto(view[done:])
                if not got:
                    raise ValueError(f"{self.path}: truncated while reading {name}")
                done += got
        return buf.view(dtype).reshape(entry["shape"])


#: name -> (dtype, shape) of the tensors a file will hold
Specs = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize


def _header(specs: Specs, metadata: dict[str, str] | None) -> tuple[bytes, dict[str, int]]:
    """The canonical safetensors header (names sorted, data in that order) and each tensor's data offset.

    safetensors' own writer orders `__metadata__` by a randomly seeded hash map, so two runs with the
    same inputs would differ byte-wise; this header makes artifacts bit-identical.
    """
    header: dict = {"__metadata__": dict(sorted((metadata or {}).items()))} if metadata else {}
    offsets, offset = {}, 0
    for name in sorted(specs):
        dtype, shape = specs[name]
        size = _nbytes(dtype, shape)
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offsets[name] = offset
        offset += size
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob, offsets


def _raw(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (one contiguous CPU copy if it is not already)."""
    return memoryview(tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy())


def _create(path: Path, specs: Specs, metadata: dict[str, str] | None) -> dict[str, int]:
    """A safetensors file of the final size with its header written; return each tensor's absolute offset."""
    head, offsets = _header(specs, metadata)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + sum(_nbytes(*spec) for spec in specs.values()))
    return {name: len(head) + off for name, off in offsets.items()}


def _put(path: Path, offset: int, tensor: torch.Tensor) -> None:
    """Write a tensor's bytes at `offset` of an existing file."""
    data = _raw(tensor)
    fd = os.open(path, os.O_WRONLY)
    try:
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
    finally:
        os.close(fd)


class WriteBehind:
    """Writes tensors at their offsets on one background thread, one write in flight at a time.

    The caller computes the next tensor while the last one is written (pwrite releases the GIL), for
    the memory of one more output tensor. A failed write is raised by the next `put` or on leaving the
    `with` block, which also waits for the write in flight, so nothing is written after it.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-behind")
        self._pending: Future | None = None

    def put(self, path: Path, offset: int, tensor: torch.Tensor) -> None:
        """Wait for the previous write, then start writing `tensor` (which must not change afterwards)."""
        self.wait()
        self._pending = self._pool.submit(_put, path, offset, tensor)

    def wait(self) -> None:
        """Block until the write in flight is done, raising its error if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.wait()
        finally:
            self._pool.shutdown(wait=True)


def save_streamed(path: str | Path, specs: Specs, produce: Callable[[str], torch.Tensor],
                  metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file atomically, computing each tensor while the last one is written (memory: two tensors).

    The bytes equal `save_tensors(path, {n: produce(n) for n in specs}, metadata)`.
    """
    with atomic_path(path) as tmp, WriteBehind() as writes:
        offsets = _create(tmp, specs, metadata)
        for name, (dtype, shape) in specs.items():
            tensor = produce(name)
            if (tensor.dtype, tuple(tensor.shape)) != (dtype, tuple(shape)):
                raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {tuple(shape)}")
            writes.put(tmp, offsets[name], tensor)


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write the safetensors format with the canonical header (see `_header`)."""
    head, _ = _header({n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for name in sorted(tensors):
            f.write(_raw(tensors[name]))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file atomically and deterministically."""
    with atomic_path(path) as tmp:
        write_safetensors(tmp, tensors, metadata)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a whole (per-layer) safetensors file."""
    f = TensorFile(path)
    return {k: f.get_tensor(k) for k in f.keys()}


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file."""
    return dict(TensorFile(path).metadata)


class ShardWriter:
    """Writes a checkpoint whose tensors are known in advance straight into their shards, then the HF index.

    `layout` lists (name, dtype, shape) in the order tensors will come; shards are cut greedily in that
    order at `max_shard_bytes`, each file is created with its final header, and every tensor is written
    at its offset as it arrives, behind the caller's next tensor (WriteBehind): memory holds two tensors,
    not a shard. Used as a context manager inside `atomic_path`, so the model directory appears only once
    complete and no write outlives the block.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        shards: list[Specs] = []
        filled = 0
        for name, dtype, shape in layout:
            size = _nbytes(dtype, shape)
            if not shards or (shards[-1] and filled + size > max_shard_bytes):
                shards.append({})
                filled = 0
            shards[-1][name] = (dtype, tuple(shape))
            filled += size
        self._specs = {name: spec for shard in shards for name, spec in shard.items()}
        self._where: dict[str, tuple[str, int]] = {}  # name -> (part file, absolute offset)
        self._parts: list[tuple[str, list[str]]] = []
        for i, shard in enumerate(shards):
            part = f"part-{i:05d}.safetensors"
            offsets = _create(self.out_dir / part, shard, {"format": "pt", **(metadata or {})})
            self._where |= {name: (part, off) for name, off in offsets.items()}
            self._parts.append((part, sorted(shard)))
        self._total_bytes = sum(_nbytes(*spec) for spec in self._specs.values())
        self._done: set[str] = set()
        self._writes = WriteBehind()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._writes.__exit__(*exc)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor of the layout at its place."""
        if name not in self._specs:
            raise KeyError(f"{name!r} is not in the checkpoint layout")
        if (tensor.dtype, tuple(tensor.shape)) != self._specs[name]:
            raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, the layout says {self._specs[name]}")
        part, offset = self._where[name]
        self._writes.put(self.out_dir / part, offset, tensor)
        self._done.add(name)

    def close(self) -> list[str]:
        """Wait for the last write, rename shards to the HF `model-0000i-of-0000n` scheme, write the index; return shard names."""
        self._writes.wait()
        missing = sorted(set(self._specs) - self._done)
        if missing:
            raise RuntimeError(f"{len(missing)} tensor(s) of the layout were never written: {missing[:5]}")
        n = len(self._parts)
        weight_map: dict[str, str] = {}
        names = []
        for i, (part, tensor_names) in enumerate(self._parts, start=1):
            final = SINGLE_NAME if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / part, self.out_dir / final)
            names.append(final)
            weight_map.update({t: final for t in tensor_names})
        if n > 1:
            index = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return names


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GB|MB|KB|B)?\s*$", re.IGNORECASE)
_UNITS = {"GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1, None: 1}


def parse_size(size: str | int) -> int:
    """'5GB', '200MB', '1.5 GB', '1000' or an int -> bytes (decimal units as in transformers); anything else is refused
    with a message saying what to write (params.yaml's sizes are validated with it)."""
    if isinstance(size, int):
        return size
    match = _SIZE.match(size)
    if match is None:
        raise ValueError(f"{size!r} is not a size; write e.g. '5GB', '200MB', '512KB' or a byte count")
    unit = match.group(2).upper() if match.group(2) else None
    return int(float(match.group(1)) * _UNITS[unit])


def is_current(path: Path, metadata: dict[str, str]) -> bool:
    """True if a per-layer artifact exists and was made from exactly these inputs."""
    if not path.is_file():
        return False
    try:
        meta = read_metadata(path)
    except Exception:  # a truncated or foreign file is simply recomputed
        return False
    return all(meta.get(k) == v for k, v in metadata.items())


def checkpoint_differences(a: Checkpoint, b: Checkpoint) -> dict[str, list[str]]:
    """What differs between two checkpoints' tensors, each list sorted: names only in `a`, names only in `b`, and shared
    names whose shape or whose dtype differs ('name [shape in a] vs [shape in b]', 'name BF16 vs F32')."""
    names, other = set(a.names()), set(b.names())
    shared = sorted(names & other)
    return {"only_a": sorted(names - other), "only_b": sorted(other - names),
            "shapes": [f"{n} {list(a.shape(n))} vs {list(b.shape(n))}" for n in shared if a.shape(n) != b.shape(n)],
            "dtypes": [f"{n} {a.dtype_name(n)} vs {b.dtype_name(n)}" for n in shared if a.dtype_name(n) != b.dtype_name(n)]}


def check_compatible(a: Checkpoint, b: Checkpoint) -> None:
    """Refuse two checkpoints whose tensor names or shapes differ, listing the differences."""
    diff = checkpoint_differences(a, b)
    problems = []
    if diff["only_a"] or diff["only_b"]:
        problems.append(f"tensor names differ: only in {a.path}: {diff['only_a'][:5]}; only in {b.path}: {diff['only_b'][:5]}")
    if diff["shapes"]:
        problems.append(f"shapes differ ({a.path} vs {b.path}): {diff['shapes'][:5]}")
    if problems:
        raise ValueError("checkpoints are not the same architecture:\n  " + "\n  ".join(problems))
