"""Save and load compressed checkpoints: model.safetensors + slim_config.json (+ HF config, tokenizer).

Writes go to a temporary sibling directory that is renamed into place only when complete, so an
interrupted run never leaves a directory that loads as if it were finished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn

from . import __version__
from .models import set_submodule
from .packed import FORMAT_VERSION, Layout, SlimLinear

log = logging.getLogger(__name__)

CONFIG_NAME = "slim_config.json"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A directory is not a usable slim checkpoint; the message says why."""


class OutputExistsError(FileExistsError):
    """The output directory exists and --overwrite was not given."""


def versions() -> dict[str, str]:
    import transformers

    return {
        "slim": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


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


def cast_dense_parts(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast embeddings, norms, lm_head (and SlimLinear biases) to `dtype`; packed codes and fp16 scales stay."""
    for mod in model.modules():
        if isinstance(mod, SlimLinear):
            if mod.bias is not None:
                mod.bias = mod.bias.to(dtype)
            continue
        for p in mod._parameters.values():
            if p is not None and p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_floating_point() and not name.endswith("inv_freq"):
                mod._buffers[name] = b.to(dtype)
    model.config.dtype = dtype
    return model


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
    layers = {n: m.layout.to_dict() for n, m in model.named_modules() if isinstance(m, SlimLinear)}
    if not layers:
        raise CheckpointError("the model has no SlimLinear layers: compress it before saving")
    if dtype is not None:
        cast_dense_parts(model, dtype)
    dtype_name = str(_dense_dtype(model)).removeprefix("torch.")

    def write(tmp: Path) -> None:
        save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "slim_format": str(FORMAT_VERSION)})
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        cfg = {
            "format": "slim", "format_version": FORMAT_VERSION, "dtype": dtype_name, "versions": versions(),
            **(meta or {}), "layers": layers,
        }
        from .export import model_card

        (tmp / "README.md").write_text(model_card(cfg, "slim", out))
        write_json(tmp / CONFIG_NAME, cfg)  # written last: its presence marks a complete checkpoint

    atomic_dir(out, write, overwrite)
    log.info("saved %s", out)
    return out


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
    if int(cfg.get("format_version", 0)) > FORMAT_VERSION or "layers" not in cfg:
        raise CheckpointError(
            f"{f}: format version {cfg.get('format_version')} is not readable by slim {__version__} "
            f"(reads up to {FORMAT_VERSION}); upgrade slim"
        )
    return cfg


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def load(
    path: str | os.PathLike, device: str = "cpu", backend: str = "auto", dtype: str | torch.dtype | None = None,
    cache: bool = False,
) -> nn.Module:
    """Load a slim checkpoint as a ready-to-run transformers model.

    `backend` picks the kernels ("auto", "reference", "cpu-int4", "cuda-2of4"; see `slim.runtime`): each
    compressed layer is read and converted to its backend's layout on its own, so neither a dense copy of a base
    weight nor a second copy of the checkpoint is ever held. `dtype` overrides the stored dtype of the dense parts;
    `cache` keeps a dense weight per layer on the reference backend (fast evaluation, dense-sized memory)."""
    from transformers import AutoConfig

    from .runtime import resolve

    p = Path(path)
    cfg = read_slim_config(p)
    weights = p / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{p} has no {WEIGHTS_NAME}")
    order = resolve(backend, device)  # an unknown or unavailable backend fails before reading anything
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, getattr(torch, cfg.get("dtype", "float32")))
    dtype = dtype or getattr(torch, cfg.get("dtype", "float32"))
    try:
        header = read_safetensors_header(weights)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {weights}: {e}") from None
    hf_config = AutoConfig.from_pretrained(p)
    with compact_heap():
        model = _build(p, cfg, hf_config, header, order, device, dtype, cache, backend)
    release_free_memory()
    model.eval()
    return model.to(device)


def _build(p: Path, cfg: dict, hf_config: Any, header: dict, order: list[str], device: str, dtype: torch.dtype,
           cache: bool, backend: str) -> nn.Module:
    """The model skeleton with the dense tensors read into it and each compressed layer converted in turn."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from .runtime import BACKENDS, convert_layer, finish

    weights = p / WEIGHTS_NAME
    with no_init_weights():  # untouched allocations: the dense linears are replaced before anything writes them
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    layouts = cfg["layers"]
    for name in layouts:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{CONFIG_NAME} names layer {name!r} that the model does not have") from None
    by_layer: dict[str, list[str]] = {}
    dense_keys = []
    for key in header:
        owner = key.rpartition(".")[0]
        (by_layer.setdefault(owner, []) if owner in layouts else dense_keys).append(key)
    unexpected = [k for k in dense_keys if not _has_tensor(model, k)]
    if unexpected:
        raise CheckpointError(f"{weights} does not match its config: unexpected {unexpected[:5]}")
    chosen: dict[str, str] = {}
    with open(weights, "rb") as f:
        sd = model.state_dict(keep_vars=True)
        for key in dense_keys:
            _read_into(f, header, key, sd[key], weights)
        missing = _not_tied(model, [k for k in sd if k not in header and k.rpartition(".")[0] not in layouts])
        del sd
        if missing:
            raise CheckpointError(f"{weights} does not match its config: missing {missing[:5]}")
        for name, layout in layouts.items():  # one compressed layer at a time: read, convert, drop the packed copy
            layer = SlimLinear(Layout.from_dict(layout), dtype=dtype)
            lsd = layer.state_dict(keep_vars=True)
            got = set(by_layer.get(name, []))
            if set(lsd) != {k.rpartition(".")[2] for k in got}:
                raise CheckpointError(f"{weights} does not match its config for {name}: it stores "
                                      f"{sorted(k.rpartition('.')[2] for k in got)}, the layout needs {sorted(lsd)}")
            for key in got:
                _read_into(f, header, key, lsd[key.rpartition(".")[2]], weights)
            new, bname = convert_layer(layer.to(device), order, name)
            if bname == "reference" and cache:
                BACKENDS["reference"].convert(new, cache=True)
            set_submodule(model, name, new)
            chosen[name] = bname
            del layer, lsd, new
            release_free_memory()  # about 1 ms; keeps the load's peak near the converted model's size
    finish(model, backend, order, chosen)
    return model


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
    head.pop("__metadata__", None)
    for v in head.values():
        if v.get("dtype") not in _ST_DTYPES:
            raise ValueError(f"unsupported tensor dtype {v.get('dtype')}")
        v["data_offsets"] = [8 + n + o for o in v["data_offsets"]]
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


def _has_tensor(model: nn.Module, key: str) -> bool:
    mod_name, _, attr = key.rpartition(".")
    try:
        mod = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        return False
    return attr in mod._parameters or (attr in mod._buffers and attr not in mod._non_persistent_buffers_set)


def _not_tied(model: nn.Module, missing: list[str]) -> list[str]:
    """Missing keys that are not tied to a loaded tensor (a tied tensor is stored once)."""
    sd = model.state_dict(keep_vars=True)
    loaded = {sd[k].data_ptr() for k in sd if k not in missing}
    return [k for k in missing if k not in sd or sd[k].data_ptr() not in loaded]


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
            "disk_bytes": sum(f.stat().st_size for f in p.iterdir() if f.is_file())}


_DTYPE_BYTES = {"U8": 1, "I8": 1, "BOOL": 1, "F16": 2, "BF16": 2, "I16": 2, "F32": 4, "I32": 4, "I64": 8, "F64": 8}


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
