"""Seconds and peak memory per block of `slim compress` at 7B, 8B and 70B block shapes, `--preset paper` against
the default recipe, with the phase breakdown, and the whole models' projected times.

Each shape is a one-block random-weight Llama (LLaMA-2-7B: hidden 4096, MLP 11008, 32 heads; Llama-3-8B: 4096,
14336, 8 KV heads; LLaMA-2-70B: 8192, 28672, 64 heads, 8 KV heads) written as sharded bf16 safetensors
(`compress_scale.write_model`, no downloads). Each run is one `slim compress` process streaming the model from
disk (`--load stream`); it reports its peak resident memory (VmHWM) and, on a GPU, torch's peak allocated and
reserved memory. A block's time is the run's compression time (calibration capture through the last block's
outputs: for one block that is one block's work plus the embedding's look-up), split by phase (`calibrate`,
`solve.*`, `io`, ...) from the checkpoint's report; the whole model's time is projected as blocks x that.

    # GPU (the paper's calibration, 128 x 2048 tokens; benchmarks/compress_blocks_gpu.sh runs this on a lent GPU)
    python benchmarks/compress_blocks.py --device cuda --out docs/results/scale/gpu
    # CPU (one 7B-shaped block at 128 x 512)
    python benchmarks/compress_blocks.py --device cpu --shapes 7B --calib-seqlen 512 --out docs/results/scale/cpu
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# name: (hidden, MLP, heads, KV heads, blocks of the real model, its name)
SHAPES = {
    "7B": (4096, 11008, 32, 32, 32, "LLaMA-2-7B"),
    "8B": (4096, 14336, 32, 8, 32, "Llama-3-8B"),
    "70B": (8192, 28672, 64, 8, 80, "LLaMA-2-70B"),
    "tiny": (64, 160, 4, 2, 2, "a tiny Llama"),  # the script's own smoke test
}
RECIPES = {"paper": ["--preset", "paper"], "default": []}
# the paper's times on one H100 for LLaMA-2-7B (its Table 21), minutes: what the GPU acceptance compares against
PAPER_MINUTES_7B = {"default": 39.0, "paper": 20.0}

CHILD = """
import json, sys
from slim.cli.commands import main
rc = main(sys.argv[1:])
peak = {"vmhwm_kib": int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])}
try:
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak.update(cuda_allocated=torch.cuda.max_memory_allocated(), cuda_reserved=torch.cuda.max_memory_reserved())
except Exception:
    pass
print('PEAK ' + json.dumps(peak), flush=True)
sys.exit(rc)
"""


def run_one(src: Path, out: Path, recipe: str, args: argparse.Namespace) -> dict:
    """One `slim compress` of `src` in its own process: its report's times and the child's peaks."""
    cmd = [sys.executable, "-c", CHILD, "compress", str(src), "--out", str(out), "--overwrite", "--load", "stream",
           "--device", args.device, "--calib-samples", str(args.calib_samples), "--calib-seqlen",
           str(args.calib_seqlen), "-q", *RECIPES[recipe], *args.extra.split()]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    log = out.parent / f"{out.name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        status = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
    wall = time.perf_counter() - t0
    text = log.read_text()
    if status != 0 or "PEAK " not in text:
        raise RuntimeError(f"{' '.join(cmd[3:])} failed (rc {status}):\n{text[-3000:]}")
    peak = json.loads(text.rsplit("PEAK ", 1)[1].splitlines()[0])
    rep = json.loads((out / "slim_config.json").read_text())["report"]
    layers = rep.get("layers", {})
    return {"recipe": recipe, "compress_seconds": rep["compress_seconds"], "wall_seconds": wall,
            "phase_seconds": rep.get("phase_seconds", {}), "peak_rss_mib": peak["vmhwm_kib"] / 1024,
            "peak_gpu_allocated_gib": peak.get("cuda_allocated", 0) / 2**30,
            "peak_gpu_reserved_gib": peak.get("cuda_reserved", 0) / 2**30,
            "mean_rel_err_final": sum(v["rel_err_final"] for v in layers.values()) / max(len(layers), 1)}


def summarize(runs: list[dict]) -> dict:
    """Per shape: the default recipe's time over the paper preset's, and each recipe's projected model time."""
    out: dict = {}
    for shape in dict.fromkeys(r["shape"] for r in runs):
        rs = {r["recipe"]: r for r in runs if r["shape"] == shape}
        blocks, name = SHAPES[shape][4], SHAPES[shape][5]
        entry = {"model": name, "blocks": blocks,
                 "projected_minutes": {k: blocks * r["compress_seconds"] / 60 for k, r in rs.items()}}
        if "paper" in rs and "default" in rs:
            entry["default_vs_paper"] = rs["default"]["compress_seconds"] / rs["paper"]["compress_seconds"]
            entry["default_vs_paper_solve"] = (rs["default"]["phase_seconds"].get("solve", 0)
                                               / max(rs["paper"]["phase_seconds"].get("solve", 0), 1e-9))
        out[shape] = entry
    return out


def table(res: dict) -> str:
    from grid import describe_machine

    a = res["args"]
    lines = [f"# Compression per block at 7B-70B shapes ({a['device']})\n",
             f"Machine: {describe_machine(res['machine'])}. Code {res['commit']}.",
             f"Calibration {a['calib_samples']} x {a['calib_seqlen']} c4 tokens; one-block random bf16 Llamas streamed "
             "from sharded safetensors; each run its own `slim compress` process.",
             f"Command: `{res['command']}`\n",
             "| shape | recipe | s / block | calibrate s | solve s | io s | peak RSS GiB | peak GPU GiB (alloc / "
             "reserved) | mean rel. error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        ph = r["phase_seconds"]
        gpu = (f"{r['peak_gpu_allocated_gib']:.1f} / {r['peak_gpu_reserved_gib']:.1f}"
               if r["peak_gpu_reserved_gib"] else "-")
        lines.append(f"| {r['shape']} | {r['recipe']} | {r['compress_seconds']:.1f} | {ph.get('calibrate', 0):.1f} | "
                     f"{ph.get('solve', 0):.1f} | {ph.get('io', 0):.1f} | {r['peak_rss_mib'] / 1024:.1f} | {gpu} | "
                     f"{r['mean_rel_err_final']:.4f} |")
    lines += ["", "Phases of the solve (seconds, summed over the block's seven linears):", "",
              "| shape | recipe | " + " | ".join(SOLVE_PARTS) + " |", "|---|---|" + "---|" * len(SOLVE_PARTS)]
    for r in res["runs"]:
        ph = r["phase_seconds"]
        lines.append(f"| {r['shape']} | {r['recipe']} | " + " | ".join(f"{ph.get(k, 0):.1f}" for k in SOLVE_PARTS)
                     + " |")
    lines += ["", "| model | blocks | projected paper min | projected default min | default / paper (block) | "
              "default / paper (solve) |", "|---|---|---|---|---|---|"]
    for _shape, s in res["summary"].items():
        pm = s["projected_minutes"]
        lines.append(f"| {s['model']} | {s['blocks']} | {pm.get('paper', float('nan')):.1f} | "
                     f"{pm.get('default', float('nan')):.1f} | {s.get('default_vs_paper', float('nan')):.2f}x | "
                     f"{s.get('default_vs_paper_solve', float('nan')):.2f}x |")
    return "\n".join(lines) + "\n"


SOLVE_PARTS = ("solve.prepare", "solve.quantize", "solve.adapter", "solve.weight", "install")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (blocks.json + blocks.md)")
    ap.add_argument("--work", default="runs/blocks", help="where the random models and checkpoints go")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--shapes", default="7B,8B,70B", help=f"comma-separated, from {', '.join(SHAPES)}")
    ap.add_argument("--recipes", default="paper,default", help="comma-separated, from paper, default")
    ap.add_argument("--calib-samples", type=int, default=128, help="calibration windows (128, the paper's)")
    ap.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per window (2048, the paper's)")
    ap.add_argument("--extra", default="", help="more `slim compress` options")
    ap.add_argument("--data-dir")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per run before it counts as failed")
    args = ap.parse_args()
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES] + [
        r for r in args.recipes.split(",") if r not in RECIPES]
    if unknown:
        ap.error(f"unknown shapes or recipes {unknown}")
    from compress_scale import write_model
    from grid import machine, source_commit

    from slim.format.checkpoint import write_json

    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"machine": machine(), "commit": source_commit(), "args": vars(args),
           "command": "python benchmarks/compress_blocks.py " + " ".join(sys.argv[1:]), "runs": []}
    for shape in args.shapes.split(","):
        hidden, mlp, heads, kv, _, _ = SHAPES[shape]
        src = work / f"{shape}-1"
        if not (src / "config.json").is_file():
            print(f"writing a one-block {shape}-shaped model ...", flush=True)
            write_model(src, hidden, mlp, 1, heads, kv, vocab=49152)
        for recipe in args.recipes.split(","):
            print(f"{shape} {recipe} ...", flush=True)
            ck = work / f"{shape}-{recipe}-ck"
            r = run_one(src, ck, recipe, args)
            r["shape"] = shape
            res["runs"].append(r)
            shutil.rmtree(ck, ignore_errors=True)
            print(f"  {r['compress_seconds']:.1f} s, peak RSS {r['peak_rss_mib'] / 1024:.1f} GiB, GPU "
                  f"{r['peak_gpu_reserved_gib']:.1f} GiB reserved", flush=True)
            res["summary"] = summarize(res["runs"])
            write_json(out / "blocks.json", res)  # after each run: an interrupted benchmark keeps what it measured
            (out / "blocks.md").write_text(table(res))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
