"""Save and load compressed checkpoints: model.safetensors + slim_config.json (+ HF config, tokenizer).

Writes go to a temporary sibling directory that is renamed into place only when complete, so an
interrupted run never leaves a directory that loads as if it were finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..names import numerics_env
from ..testing.faults import fault
from .card import model_card
from .packed import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, SlimLinear

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A directory is not a usable slim checkpoint; the message says why."""


class OutputExistsError(FileExistsError):
    """The output directory exists and --overwrite was not given."""


def versions() -> dict[str, Any]:
    """Library versions, and the numerics-changing environment variables that are set (`environment`, only then):
    recorded with every checkpoint and result."""
    import transformers

    out: dict[str, Any] = {
        "slim": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    env = numerics_env()
    if env:
        out["environment"] = env
    return out


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output directory before any long work starts (unless overwriting)."""
    p = Path(out)
    if p.exists() and not overwrite:
        raise OutputExistsError(f"output directory {p} already exists; pass --overwrite to replace it")
    if p.exists() and not p.is_dir():
        raise OutputExistsError(f"output path {p} exists and is not a directory")
    return p


def atomic_dir(out: Path, write, overwrite: bool) -> None:
    """Call write(tmp_dir), then move tmp_dir to `out` (replacing it only if overwrite)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        if out.exists():
            if not overwrite:
                raise OutputExistsError(f"output directory {out} appeared during the run; not replacing it")
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def resolve_dtype(name: str, source_dtype: torch.dtype, gguf: bool = False) -> torch.dtype:
    """The dtype of everything that is not a compressed linear: `auto` keeps the source's (a GGUF source,
    dequantized to fp32 on load, becomes bf16)."""
    if name == "auto":
        return torch.bfloat16 if gguf else source_dtype
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; choose auto, bf16, fp16 or fp32")
    return DTYPES[name]


def cast_dense_parts(model: nn.Module, dtype: torch.dtype | Mapping[str, torch.dtype]) -> dict[str, torch.dtype]:
    """Cast embeddings, norms, lm_head (and SlimLinear biases) of a model, or of one block, to `dtype`; packed codes
    and fp16 scales stay (`Module.to(dtype)` would cast the scales too). Returns each cast tensor's previous dtype:
    passed back as `dtype`, it undoes the cast tensor by tensor (blocks may keep some parts in fp32)."""
    before: dict[str, torch.dtype] = {}

    def cast(key: str, t: torch.Tensor) -> torch.Tensor:
        before[key] = t.dtype
        want = dtype if isinstance(dtype, torch.dtype) else dtype.get(key, t.dtype)
        return t if t.dtype == want else t.to(want)

    for mname, mod in model.named_modules():
        if isinstance(mod, SlimLinear):
            if mod.bias is not None:
                mod.bias = cast(f"{mname}.bias", mod.bias)
            continue
        for k, p in mod._parameters.items():
            if p is not None and p.is_floating_point():
                p.data = cast(f"{mname}.{k}", p.data)
        for k, b in list(mod._buffers.items()):
            if b is not None and b.is_floating_point() and not k.endswith("inv_freq"):
                mod._buffers[k] = cast(f"{mname}.{k}", b)
    if isinstance(dtype, torch.dtype) and hasattr(model, "config") and hasattr(model, "get_input_embeddings"):
        model.config.dtype = dtype
    return before


def _dense_dtype(model: nn.Module) -> torch.dtype:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.dtype
    return next(model.parameters()).dtype


def save(
    model: nn.Module, out: str | os.PathLike, tokenizer=None, meta: dict[str, Any] | None = None,
    overwrite: bool = False, dtype: torch.dtype | None = None,
) -> Path:
    """Save a compressed model; `meta` (config, data hashes, report) goes into slim_config.json.

    `dtype` casts everything that is not a compressed linear (embeddings, norms, lm_head) first."""
    out = Path(out)
    if not any(isinstance(m, SlimLinear) for m in model.modules()):
        raise CheckpointError("the model has no SlimLinear layers: compress it before saving")
    if dtype is not None:
        cast_dense_parts(model, dtype)
    atomic_dir(out, lambda tmp: write_checkpoint(tmp, model, model_tensors(model), tokenizer, meta, out), overwrite)
    log.info("saved %s", out)
    return out


def model_tensors(model: nn.Module, skip_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: the state dict with a tensor shared by several keys (tied embeddings)
    stored once, under its first key; keys under `skip_prefix` left out (blocks written elsewhere)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, torch.dtype, tuple[int, ...]]] = set()
    for k, t in model.state_dict().items():
        if skip_prefix and k.startswith(skip_prefix):
            continue
        if t.device.type != "meta" and t.numel():
            ident = (t.data_ptr(), t.dtype, tuple(t.shape))
            if ident in seen:
                continue
            seen.add(ident)
        out[k] = t
    return out


def write_checkpoint(tmp: Path, model: nn.Module, tensors: dict[str, Any], tokenizer, meta: dict[str, Any] | None,
                     out: Path) -> str:
    """The files of a checkpoint into `tmp`; slim_config.json last, with the content hash of the tensors."""
    layers = {n: m.layout.to_dict() for n, m in model.named_modules() if isinstance(m, SlimLinear)}
    if not layers:
        raise CheckpointError("the model has no SlimLinear layers: compress it before saving")
    digest = write_safetensors(tmp / WEIGHTS_NAME, tensors, {"format": "pt", "slim_format": str(FORMAT_VERSION)})
    model.config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    cfg = {
        "format": "slim", "format_version": FORMAT_VERSION, "dtype": str(_dense_dtype(model)).removeprefix("torch."),
        "versions": versions(), **(meta or {}), "content_sha256": digest, "layers": layers,
    }
    (tmp / "README.md").write_text(model_card(cfg, "slim", out))
    write_json(tmp / CONFIG_NAME, cfg)  # written last: its presence marks a complete checkpoint
    return digest


class FileSlice:
    """A tensor's bytes inside another safetensors file (copied without being loaded)."""

    def __init__(self, path: Path, entry: dict[str, Any]) -> None:
        self.path, self.dtype, self.shape = path, entry["dtype"], list(entry["shape"])
        self.start, self.stop = entry["data_offsets"]

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor | FileSlice], metadata: dict[str, str],
                      fault_point: str = "save") -> str:
    """A safetensors file with its tensors in key order (so equal contents give equal bytes), written to a
    temporary name, flushed to disk and renamed; returns the SHA-256 of the file. Tensors given as `FileSlice`s are
    copied from their files in chunks, so assembling a large checkpoint never holds it in memory."""
    keys = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": metadata}
    off = 0
    for k in keys:
        t = tensors[k]
        if isinstance(t, FileSlice):
            dt, shape, n = t.dtype, t.shape, t.nbytes
        else:
            dt, shape, n = _ST_NAMES[t.dtype], list(t.shape), t.numel() * t.element_size()
        header[k] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    h = hashlib.sha256()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        def put(b: bytes | memoryview) -> None:
            f.write(b)
            h.update(b)

        put(len(head).to_bytes(8, "little"))
        put(head)
        for j, k in enumerate(keys):
            if j == len(keys) // 2:
                fault(fault_point)
            t = tensors[k]
            if isinstance(t, FileSlice):
                with open(t.path, "rb") as src:
                    src.seek(t.start)
                    left = t.nbytes
                    while left:
                        chunk = src.read(min(left, 16 << 20))
                        if not chunk:
                            raise CheckpointError(f"{t.path} ended while copying {k}")
                        put(chunk)
                        left -= len(chunk)
            elif t.numel():
                put(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify(path: str | os.PathLike) -> str:
    """Check a checkpoint's tensors against the content hash in its slim_config.json; returns the hash."""
    p = Path(path)
    cfg = read_slim_config(p)
    want = cfg.get("content_sha256")
    if not want:
        raise CheckpointError(f"{p / CONFIG_NAME} records no content hash (written by an older slim); nothing to "
                              "verify against")
    got = file_sha256(p / WEIGHTS_NAME)
    if got != want:
        raise CheckpointError(f"{p / WEIGHTS_NAME} does not match its recorded content hash (sha256 {got[:16]}… vs "
                              f"{want[:16]}…): the file was modified or damaged; compress again or restore it")
    return got


def read_slim_config(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a directory")
    f = p / CONFIG_NAME
    if not f.is_file():
        raise CheckpointError(f"{p} has no {CONFIG_NAME}: not a slim checkpoint (or an unfinished one)")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != "slim":
        raise CheckpointError(f"{f} is not a slim config (missing \"format\": \"slim\")")
    version = cfg.get("format_version")
    if type(version) is not int or version < 1:
        raise CheckpointError(f"{f}: format_version must be a positive integer, not {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{f}: format version {version} is not readable by slim {__version__} (reads up to {FORMAT_VERSION}); "
            "upgrade slim"
        )
    layers = cfg.get("layers")
    if not isinstance(layers, dict) or not layers or not all(isinstance(k, str) for k in layers):
        raise CheckpointError(f"{f}: \"layers\" must map layer names to layouts")
    if not isinstance(cfg.get("dtype", "float32"), str) or cfg.get("dtype", "float32") not in _DENSE_DTYPES:
        raise CheckpointError(f"{f}: dtype {cfg.get('dtype')!r} is not one of {sorted(_DENSE_DTYPES)}")
    return cfg


_DENSE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def stored_dtype(cfg: dict[str, Any]) -> torch.dtype:
    """The dtype a checkpoint's dense parts are stored in (checked by read_slim_config)."""
    return _DENSE_DTYPES[cfg.get("dtype", "float32")]


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()



def _libc():  # noqa: ANN202 - glibc through ctypes, or None (another libc, another OS)
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            lib = ctypes.CDLL("libc.so.6")
            _LIBC = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
        except OSError:
            _LIBC = False
    return _LIBC or None


_LIBC = None
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere). Converting layers one by
    one leaves many freed few-MB blocks that glibc would otherwise keep, inflating resident memory."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


@contextlib.contextmanager
def compact_heap():
    """While converting layers, serve every allocation of 64 KiB or more from its own mapping (glibc's mmap
    threshold), so that the conversion's few-MB temporaries leave no holes between the long-lived kernel buffers:
    holes that a forward pass later refills page by page, which showed as 150-350 MiB of resident memory after a
    512-token prefill of SmolLM2. After it the threshold is fixed at 32 MiB (glibc's own ceiling; fixing it only
    stops it from moving). SLIM_MALLOC_TUNING=0 leaves malloc alone."""
    lib = _libc() if os.environ.get("SLIM_MALLOC_TUNING", "1") != "0" else None
    if lib is not None:
        lib.mallopt(_M_MMAP_THRESHOLD, 64 << 10)
    try:
        yield
    finally:
        if lib is not None:
            lib.mallopt(_M_MMAP_THRESHOLD, 32 << 20)

_ST_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "BOOL": torch.bool, "F16": torch.float16, "BF16": torch.bfloat16,
              "I16": torch.int16, "F32": torch.float32, "I32": torch.int32, "I64": torch.int64, "F64": torch.float64}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor entries of a safetensors file, offsets made absolute. Read by hand (the format is an 8-byte length, a
    JSON header, then raw bytes) so that tensors can be read straight into their destinations: going through
    safetensors' memory map would count the whole file in the process's peak resident memory."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("file too short for a safetensors header")
        n = int.from_bytes(raw, "little")
        if n <= 0 or n > 100 * 2**20:
            raise ValueError("not a safetensors file (bad header length)")
        head = json.loads(f.read(n))
        size = os.fstat(f.fileno()).st_size
    if not isinstance(head, dict):
        raise ValueError("the header is not a JSON object")
    head.pop("__metadata__", None)
    for k, v in head.items():
        if not isinstance(v, dict) or not isinstance(v.get("dtype"), str) or v["dtype"] not in _ST_DTYPES:
            raise ValueError(f"tensor {k!r}: unsupported entry or dtype")
        shape, offs = v.get("shape"), v.get("data_offsets")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 1 << 40 for d in shape):
            raise ValueError(f"tensor {k!r}: bad shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                or not 0 <= offs[0] <= offs[1] or 8 + n + offs[1] > size):
            raise ValueError(f"tensor {k!r}: data offsets {offs!r} outside the file")
        v["data_offsets"] = [8 + n + o for o in offs]
    return head


def _read_into(f, header: dict[str, dict[str, Any]], key: str, dest: torch.Tensor, path: Path) -> None:
    """Read tensor `key` from the open file straight into `dest` (converting the dtype if it differs)."""
    import ctypes

    e = header[key]
    shape = tuple(e["shape"])
    if shape != tuple(dest.shape):
        raise CheckpointError(f"{path}: {key} has shape {shape}, the model expects {tuple(dest.shape)}")
    start, stop = e["data_offsets"]
    src_dtype = _ST_DTYPES[e["dtype"]]
    tmp = dest if src_dtype == dest.dtype and dest.is_contiguous() and dest.device.type == "cpu" else \
        torch.empty(shape, dtype=src_dtype)
    nbytes = tmp.numel() * tmp.element_size()
    if stop - start != nbytes:
        raise CheckpointError(f"{path}: {key} holds {stop - start} bytes, its shape needs {nbytes}")
    f.seek(start)
    if nbytes and f.readinto((ctypes.c_char * nbytes).from_address(tmp.data_ptr())) != nbytes:
        raise CheckpointError(f"{path}: truncated while reading {key}")
    if tmp is not dest:
        with torch.no_grad():
            dest.copy_(tmp)



def dir_bytes(p: str | os.PathLike) -> int:
    """Bytes of every file under a directory (a checkpoint or an export)."""
    return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())


def stored_sizes(path: str | os.PathLike) -> dict[str, int]:
    """Bytes of a checkpoint's tensors (from the safetensors header): compressed linears and everything else."""
    from safetensors import safe_open

    p = Path(path)
    cfg = read_slim_config(p)
    prefixes = tuple(f"{name}." for name in cfg["layers"])
    linear = other = 0
    with safe_open(str(p / WEIGHTS_NAME), framework="pt") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            n = 1
            for d in sl.get_shape():
                n *= d
            nbytes = n * _DTYPE_BYTES.get(sl.get_dtype(), 4)
            if key.startswith(prefixes):
                linear += nbytes
            else:
                other += nbytes
    return {"linear_bytes": linear, "other_bytes": other, "total_bytes": linear + other,
            "disk_bytes": dir_bytes(p)}


_DTYPE_BYTES = {"U8": 1, "I8": 1, "BOOL": 1, "F16": 2, "BF16": 2, "I16": 2, "F32": 4, "I32": 4, "I64": 8, "F64": 8}


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
