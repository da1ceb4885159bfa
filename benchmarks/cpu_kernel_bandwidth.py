"""Where a 7B-shaped block's decode time goes in slim's CPU kernel: one token through the block's four kernel calls
(q/k/v in one call, o, gate/up in one call, down) as the lean decoder makes them, 2:4 + 4-bit per-tensor codes with
and without rank-0.1 int4 adapters, at 1 and all threads; bytes read per second (packed codes, positions, scales,
adapters) against a plain memory read of the same bytes (torch's sum over a uint8 buffer, the machine's streaming
bound as this process sees it). Median of --reps calls, the weights cycled through a buffer larger than the cache.

    python benchmarks/cpu_kernel_bandwidth.py --out docs/results/runtime/cpu_kernel
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from grid import describe_machine, machine, source_commit

from slim.format.checkpoint import write_json
from slim.kernels import native
from slim.runtime.cpu_int4 import Int4Linear
from slim.testing.random_layers import random_slim_linear

BLOCK = {"q/k/v": [(4096, 4096)] * 3, "o": [(4096, 4096)], "gate/up": [(11008, 4096)] * 2, "down": [(4096, 11008)]}


def _bytes(m: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in m.buffers() if b is not None)


def build(rank: float, copies: int) -> list[dict]:
    """`copies` blocks' kernel calls (distinct weights, so that one block's reads do not hit the cache)."""
    kernel = native.load()
    blocks, seed = [], 0
    for _ in range(copies):
        calls = {}
        for name, shapes in BLOCK.items():
            lin = kernel.Linears(shapes[0][1])
            nbytes = 0
            for d_out, d_in in shapes:
                m = Int4Linear(random_slim_linear(d_out, d_in, rank=round(rank * min(d_out, d_in)), seed=seed))
                seed += 1
                lin.add(*m.native_args())
                nbytes += _bytes(m)
                calls.setdefault("_keep", []).append(m)
            calls[name] = (lin, shapes[0][1], nbytes)
        blocks.append(calls)
    return blocks


def time_calls(blocks: list[dict], reps: int) -> dict:
    out = {}
    for name in BLOCK:
        _, k, nbytes = blocks[0][name]
        x = torch.randn(1, k)
        ts = []
        for i in range(reps + 1):
            lin = blocks[i % len(blocks)][name][0]
            t = time.perf_counter()
            lin.forward(x)
            ts.append(time.perf_counter() - t)
        s = statistics.median(ts[1:])
        out[name] = {"ms": s * 1e3, "bytes": nbytes, "gb_per_s": nbytes / s / 1e9}
    total_s = sum(v["ms"] for v in out.values()) / 1e3
    total_b = sum(v["bytes"] for v in out.values())
    out["block"] = {"ms": total_s * 1e3, "bytes": total_b, "gb_per_s": total_b / total_s / 1e9}
    return out


def stream_bound(nbytes: int, reps: int) -> float:
    bufs = [torch.randint(0, 255, (nbytes,), dtype=torch.uint8) for _ in range(3)]
    ts = []
    for i in range(reps + 1):
        t = time.perf_counter()
        bufs[i % 3].view(torch.int64).sum()
        ts.append(time.perf_counter() - t)
    return nbytes / statistics.median(ts[1:]) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--copies", type=int, default=3, help="distinct blocks cycled through (3)")
    args = ap.parse_args()
    if native.load() is None:
        raise SystemExit(f"slim's CPU kernel is not available: {native.unavailable_reason()}")
    threads = torch.get_num_threads()
    res = {"machine": machine(), "commit": source_commit(), "rows": {}}
    for label, rank in (("2:4 + 4-bit", 0.0), ("2:4 + 4-bit + rank-0.1 int4 adapters", 0.1)):
        blocks = build(rank, args.copies)
        for t in sorted({1, threads}):
            torch.set_num_threads(t)
            r = time_calls(blocks, args.reps)
            r["stream_gb_per_s"] = stream_bound(r["block"]["bytes"], args.reps)
            res["rows"][f"{label}, {t} thread{'s' if t > 1 else ''}"] = r
            print(f"{label}, {t} threads: block {r['block']['ms']:.2f} ms, {r['block']['gb_per_s']:.1f} GB/s "
                  f"(plain read {r['stream_gb_per_s']:.1f} GB/s)", flush=True)
        torch.set_num_threads(threads)
        del blocks
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", res)
    lines = [f"Machine: {describe_machine(res['machine'])}; commit {res['commit']}.",
             "`python benchmarks/cpu_kernel_bandwidth.py --out " + args.out + "`", "",
             "| layout, threads | " + " | ".join(BLOCK) + " | block | GB/s | plain read GB/s |",
             "|---|" + "---|" * (len(BLOCK) + 3)]
    for k, r in res["rows"].items():
        lines.append(f"| {k} | " + " | ".join(f"{r[n]['ms']:.2f} ms" for n in BLOCK) +
                     f" | {r['block']['ms']:.2f} ms | {r['block']['gb_per_s']:.1f} | {r['stream_gb_per_s']:.1f} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
