"""The README.md written beside a slim checkpoint (by slim.format.checkpoint) and each export (slim.export).

Imports nothing from slim but the stored format's file names, so that both writers reach it and neither imports
the other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .packed import WEIGHTS_NAME

# ranks vLLM serves LoRA adapters at (max_lora_rank)
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

LOAD_COMMANDS = {
    "slim": ("import slim\nmodel = slim.load(\"{path}\")  # backend=\"auto\": slim's int4 kernels on CPU\n"
             "# or: slim generate {path} \"Hello\"   /   slim eval {path}"),
    "compressed-tensors": ("# pip install compressed-tensors\nfrom transformers import AutoModelForCausalLM\n"
                           "model = AutoModelForCausalLM.from_pretrained(\"{path}\")\n"
                           "# vLLM (W4A16 kernels): vllm serve {path}"),
    "peft": ("# pip install peft compressed-tensors\nfrom peft import PeftModel\n"
             "from transformers import AutoModelForCausalLM, CompressedTensorsConfig\n"
             "# PEFT wraps dense Linears: decompress the base as it loads\n"
             "base = AutoModelForCausalLM.from_pretrained(\"{path}/base\", "
             "quantization_config=CompressedTensorsConfig(run_compressed=False))\n"
             "model = PeftModel.from_pretrained(base, \"{path}/adapter\")\n"
             "# vLLM: LLM(\"{path}/base\", enable_lora=True, max_lora_rank={max_rank}) with "
             "LoRARequest(\"slim\", 1, \"{path}/adapter\")"),
    "merged": ("from transformers import AutoModelForCausalLM\n"
               "model = AutoModelForCausalLM.from_pretrained(\"{path}\")"),
}

WHAT = {
    "slim": "slim's own packed checkpoint (format 1): 2 kept 4-bit codes + 2-bit positions per group of 4, "
            "int4 adapters; loads with `slim.load` only, which runs slim's kernels.",
    "compressed-tensors": "the compressed base (mask · quantized weights, adapters not folded in) as a "
                          "compressed-tensors W4A16 `pack-quantized` checkpoint: dense int4 layout, pruned "
                          "slots at zero codes.",
    "peft": "`base/`: the compressed base as compressed-tensors W4A16; `adapter/`: SLiM's low-rank adapters as a "
            "PEFT LoRA adapter (lora_alpha = r, so ΔW = B·A exactly).",
    "merged": "a plain transformers checkpoint with the adapters folded into dense weights: the largest format, "
              "readable by any tool.",
}


def model_card(cfg: dict[str, Any], fmt: str, path: Path, info: dict[str, Any] | None = None,
               src: Path | None = None) -> str:
    """README.md for a checkpoint or an export: recipe, bits per weight, sizes, perplexity if measured, and the
    exact load command."""
    c = cfg.get("config") or {}
    rep = cfg.get("report") or {}
    src_model = (cfg.get("source") or {}).get("model") or (cfg.get("source") or {}).get("path") or "a causal LM"
    q, sp, ad = c.get("quant", {}), c.get("sparsity", {}), c.get("adapter", {})
    lines = [f"# {Path(path).name}: {src_model}, compressed with slim ({fmt})", "", WHAT[fmt], ""]
    lines += ["## Recipe", ""]
    if c:
        lines += [f"- sparsity: {sp.get('pattern')} ({sp.get('method')})",
                  f"- quantization: {q.get('bits')}-bit {q.get('method')}, group size "
                  f"{q.get('group_size') or 'per tensor'}",
                  f"- adapters: {ad.get('method')}, rank {ad.get('rank')}, "
                  f"{'int' + str(ad.get('bits')) if ad.get('quantize') else 'fp16'}",
                  f"- calibration: {c.get('calib', {}).get('data')}, {c.get('calib', {}).get('n_samples')} × "
                  f"{c.get('calib', {}).get('seqlen')} tokens, seed {c.get('calib', {}).get('seed')}"]
    else:
        lines += ["- (recipe not recorded)"]
    lines += ["", "## Size", ""]
    if rep.get("bits_per_weight"):
        lines.append(f"- compressed linears: {rep['bits_per_weight']:.3f} bits per weight as slim stores them "
                     f"({rep.get('linear_bytes', 0) / 2**20:.1f} MiB vs {rep.get('linear_fp16_bytes', 0) / 2**20:.1f} "
                     "MiB in fp16)")
    if info and info.get("bits_per_weight"):
        with_ad = ", adapters included" if fmt != "compressed-tensors" else ""
        lines.append(f"- compressed linears in this format: {info['bits_per_weight']:.3f} bits per weight "
                     f"({info['linear_bytes'] / 2**20:.1f} MiB{with_ad})")
    if info and info.get("bytes"):
        lines.append(f"- this directory: {info['bytes'] / 2**20:.1f} MiB on disk")
    if src is not None:
        lines.append(f"- the slim checkpoint it came from: {(Path(src) / WEIGHTS_NAME).stat().st_size / 2**20:.1f} MiB")
    results = _results(Path(src) if src is not None else Path(path))
    lines += ["", "## Quality", ""]
    for key, what in (("dense", "the dense model"), ("compressed", "this compressed model (slim)")):
        r = results.get(key)
        if isinstance(r, dict) and r.get("ppl") is not None:
            lines.append(f"- WikiText-2 perplexity of {what}: {r['ppl']:.3f} ({r.get('windows')} windows of "
                         f"{r.get('seqlen')} tokens)")
    if not any(isinstance(results.get(k), dict) for k in ("dense", "compressed")):
        lines.append("- not measured at compression time; run `slim eval <dir>` (WikiText-2 perplexity)")
    lora = (info or {}).get("lora", {})
    max_rank = max([lora.get("r", 1), *lora.get("rank_pattern", {}).values()])
    lines += ["", "## Load", "", "```python",
              LOAD_COMMANDS[fmt].format(path=Path(path).resolve(), max_rank=next(
                  (v for v in VLLM_RANKS if v >= max_rank), max_rank)), "```", ""]
    if fmt != "slim":
        lines += ["Exported by `slim export` from a slim checkpoint; `slim_export.json` records the recipe, versions "
                  "and calibration-data hashes.", ""]
    return "\n".join(lines)


def _results(p: Path) -> dict[str, Any]:
    try:
        return json.loads((p / "results.json").read_text())
    except (OSError, ValueError):
        return {}


__all__ = ["LOAD_COMMANDS", "VLLM_RANKS", "WHAT", "model_card"]
