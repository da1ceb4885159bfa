"""Layer-wise speed of the run-time backends against a dense layer, side by side in one process.

For each weight shape (Llama-2-7B, Llama-3-8B, a 70B) and token count, times one compressed linear (2:4, 4-bit
SLiM-Quant per-tensor codes, as the default recipe stores it) on each path, alone and with rank-0.1 int4 adapters
as stored, against the dense bf16 (CPU) / fp16 (GPU) layer of the same shape; median of repeats, paths
interleaved so that the machine's load hits them alike. Writes OUT/results.json and OUT/README.md.

    python benchmarks/runtime_layers.py --out docs/results/runtime
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from grid import describe_machine, machine, source_commit

from slim.format.checkpoint import write_json
from slim.runtime import cpu_int4
from slim.testing.random_layers import random_slim_linear

SHAPES = {  # (d_out, d_in)
    "llama2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "llama3-8b": [(14336, 4096), (4096, 14336)],
    "70b": [(8192, 8192), (28672, 8192), (8192, 28672)],
}
BATCHES = [1, 8, 16, 64, 128]


def timeit(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def cpu_paths(d_out: int, d_in: int, rank: int) -> dict:
    layer = random_slim_linear(d_out, d_in, rank=rank)
    mod = cpu_int4.convert(layer)
    del layer
    return mod


@torch.no_grad()
def bench_shape(d_out: int, d_in: int, batches: list[int], reps: int) -> list[dict]:
    dense = torch.randn(d_out, d_in).to(torch.bfloat16)
    rank = round(0.1 * min(d_out, d_in))
    mods = {"base": cpu_paths(d_out, d_in, 0), "base+adapters": cpu_paths(d_out, d_in, rank)}
    ad = mods["base+adapters"]
    a16 = torch.randn(ad.ad_A.n, d_in).to(torch.bfloat16)  # the same adapters as bf16 matrices (padded rank)
    b16 = torch.randn(d_out, ad.ad_A.n).to(torch.bfloat16)
    rows = []
    for b in batches:
        x = torch.randn(b, d_in).to(torch.bfloat16)
        row = {"shape": [d_out, d_in], "tokens": b, "rank": rank}
        t_dense = []
        timings: dict[str, list[float]] = {}
        for _ in range(reps):  # interleave: one repeat of every path per round
            t_dense.append(timeit(lambda x=x: F.linear(x, dense), 1))
            for name, mod in mods.items():
                for path, thr in (("kernel", 1 << 30), ("gemm", 0), ("chosen", cpu_int4.GEMM_MIN_TOKENS[mod.kernel])):
                    mod.gemm_min_tokens = thr
                    timings.setdefault(f"{name}/{path}", []).append(timeit(lambda m=mod, x=x: m(x), 1))
            timings.setdefault("adapters/int4", []).append(timeit(lambda x=x: ad.ad_B.mm(ad.ad_A.mm(x)), 1))
            timings.setdefault("adapters/bf16", []).append(timeit(lambda x=x: F.linear(F.linear(x, a16), b16), 1))
        row["dense_bf16_ms"] = 1e3 * statistics.median(t_dense)
        for k, v in timings.items():
            row[f"{k}_ms"] = 1e3 * statistics.median(v)
            row[f"{k}_speedup"] = row["dense_bf16_ms"] / row[f"{k}_ms"]
        rows.append(row)
        print(f"{d_out}x{d_in} tokens {b}: dense {row['dense_bf16_ms']:.2f} ms; "
              + ", ".join(f"{k} {row[f'{k}_speedup']:.2f}x" for k in timings), flush=True)
    for mod in mods.values():
        mod.gemm_min_tokens = cpu_int4.GEMM_MIN_TOKENS[mod.kernel]
    for r in rows:
        r["kernel"] = mods["base"].kernel
    return rows


def table(res: dict) -> str:
    lines = [
        "# Layer-wise speed: cpu-int4 against a dense bf16 layer\n",
        f"Machine: {describe_machine(res['machine'])}. Commit {res['commit']}. One process, paths interleaved, median "
        f"of {res['reps']} repeats. A compressed layer: 2:4 + 4-bit per-tensor codes (the default recipe's layout), "
        "alone (`base`) and with rank-0.1 int4 adapters as stored (`+ad`). Speed-up = dense bf16 time / path time "
        f"(> 1 is faster). The last two columns time the adapters alone, int4 through the kernel (as run) against "
        "the same shapes as bf16 matmuls. `kernel`: the int4 kernel at every token count; `gemm`: dequantize into a "
        f"transient buffer + GEMM; `chosen`: what the backend runs (the int4 kernel, here `{res['kernel']}`, below "
        f"{res['gemm_min_tokens'][res['kernel']]} tokens, else gemm). `slim` is slim's own AVX2 kernel (int8-quantized "
        "activations per block of 32, one call per layer with its adapters); `torch` is PyTorch's "
        "`_weight_int4pack_mm_for_cpu`.\n",
        "| shape (out × in) | tokens | dense bf16 ms | base kernel | base gemm | **base chosen** | +ad kernel "
        "| +ad gemm | **+ad chosen** | adapters int4 ms | adapters bf16 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        s = lambda k, r=r: f"{r[k + '_speedup']:.2f}×"  # noqa: E731
        lines.append(
            f"| {r['shape'][0]} × {r['shape'][1]} | {r['tokens']} | {r['dense_bf16_ms']:.2f} | {s('base/kernel')} | "
            f"{s('base/gemm')} | **{s('base/chosen')}** | {s('base+adapters/kernel')} | {s('base+adapters/gemm')} | "
            f"**{s('base+adapters/chosen')}** | {r['adapters/int4_ms']:.2f} | {r['adapters/bf16_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (results.json + README.md)")
    ap.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="token counts")
    ap.add_argument("--reps", type=int, default=5, help="repeats per path (median)")
    args = ap.parse_args()
    why = cpu_int4.available("cpu")
    if why:
        raise SystemExit(f"cpu-int4 cannot run here: {why}")
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for name in args.models.split(","):
        for d_out, d_in in SHAPES[name]:
            for r in bench_shape(d_out, d_in, batches, args.reps):
                rows.append({"model": name, **r})
    res = {"machine": machine(), "commit": source_commit(), "reps": args.reps,
           "gemm_min_tokens": cpu_int4.GEMM_MIN_TOKENS, "kernel": rows[0]["kernel"] if rows else None, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "layers.json", res)
    (out / "layers.md").write_text(table(res))
    print(f"wrote {out / 'layers.md'}")


if __name__ == "__main__":
    main()
