"""GPU run time of slim's `cuda-int4` backend against the kernels users have today, in one prepared run.

Layer-wise: for Llama-2-7B, Llama-3-8B and 70B weight shapes and 1-128 tokens, one linear's time on cuBLAS fp16 and
bf16 (dense), torch's dense int4 kernel (`_weight_int4pack_mm`, group 128), cuSPARSELt fp16 2:4
(`to_sparse_semi_structured`), and slim's 2:4 + 4-bit layer: the path `auto` picks, each forced path (GEMV, GEMM,
dequantize + cuBLAS: where the crossovers lie), and the base with rank-0.1 adapters as stored (int4 through the
same kernels, and as 16-bit GEMMs). `triton.testing.do_bench`: CUDA events, L2 flushed before every repetition,
medians. Each slim figure also reads as GB/s against the device-to-device copy bandwidth measured first (a figure
above that ceiling means the benchmark is broken).
End to end: greedy decode tokens/s of a random-weight Llama with Llama-2-7B block shapes (a few blocks), dense bf16
against slim (2:4 + 4-bit, alone and with rank-0.1 int4 adapters), eager and with the compiled static-cache loop.
Everything is built on the device from random weights (no downloads). Results go to OUT/gpu.json (rewritten after
every row, so a run cut short keeps what it measured) and OUT/gpu.md.

    python benchmarks/gpu_runtime.py --out docs/results/runtime/gpu          # on a CUDA machine, ~6-8 min
    TRITON_INTERPRET=1 python benchmarks/gpu_runtime.py --smoke --out /tmp/g  # CPU: tiny shapes, checks the script
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from grid import machine, source_commit

from slim.format.checkpoint import write_json
from slim.runtime import cuda_int4
from slim.testing.random_layers import random_slim_linear

SHAPES = {  # (d_out, d_in), as the issue names them: out x in
    "llama2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "llama3-8b": [(14336, 4096), (4096, 14336)],
    "70b": [(8192, 8192), (28672, 8192), (8192, 28672)],
}
TOKENS = [1, 4, 8, 16, 32, 64, 128]
GEMV_TOKENS = 16  # the GEMV re-reads the weight for every row: not timed past this
VARIANT_TOKENS = 64  # the GEMM's other tile expansion is timed up to this
SMOKE_SHAPES = {"smoke": [(96, 256), (256, 96)]}
SMOKE_TOKENS = [1, 4, 17]


class Timer:
    """Median seconds of `fn`: on CUDA `do_bench` (events, L2 flushed before each repetition); elsewhere a host
    clock (the smoke run only checks that the script works)."""

    def __init__(self, cuda: bool, rep_ms: int) -> None:
        self.cuda, self.rep_ms = cuda, rep_ms

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            from triton.testing import do_bench

            return do_bench(fn, warmup=max(10, self.rep_ms // 4), rep=self.rep_ms, return_mode="median") * 1e-3
        fn()
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)


def copy_bandwidth(dev: torch.device) -> float | None:
    """Device-to-device copy, bytes read + written per second: the memory ceiling the layer figures are held to."""
    if dev.type != "cuda":
        return None
    from triton.testing import do_bench

    bufs = [torch.empty(1 << 30, dtype=torch.uint8, device=dev) for _ in range(2)]
    s = do_bench(lambda: bufs[1].copy_(bufs[0]), warmup=25, rep=200, return_mode="median") * 1e-3
    return 2 * (1 << 30) / s


def slim_bytes(mod: cuda_int4.Int4CudaLinear, tokens: int, act_bytes: int = 2) -> int:
    """The fewest bytes one call moves: every buffer once, the activations in and out."""
    w = sum(t.numel() * t.element_size() for t in mod.buffers())
    return w + tokens * (mod.in_features + mod.out_features) * act_bytes


def torch_int4(d_out: int, d_in: int, dev: torch.device, group: int = 128) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch's dense int4 kernel (tinygemm) on random nibbles, group-128 bf16 scales and zeros."""
    packed = torch.randint(0, 256, (d_out, d_in // 2), dtype=torch.uint8, device=dev)
    w = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
    sz = (torch.rand(d_in // group, d_out, 2, device=dev) * 0.01).to(torch.bfloat16)
    return lambda x: torch.ops.aten._weight_int4pack_mm(x, w, group, sz)


def cusparselt_fp16(d_out: int, d_in: int, dev: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = False  # cuSPARSELt where torch has it
    mask = torch.tensor([1, 1, 0, 0], dtype=torch.bool, device=dev).repeat(d_out, d_in // 4)
    w = to_sparse_semi_structured(torch.randn(d_out, d_in, device=dev, dtype=torch.float16) * mask)
    return lambda x: F.linear(x, w)


def layer_rows(d_out: int, d_in: int, tokens: list[int], dev: torch.device, timer: Timer, smoke: bool) -> list[dict]:
    """Every method at every token count for one weight shape."""
    rank = int(0.1 * min(d_out, d_in))
    act = torch.float32 if smoke else torch.float16
    base = cuda_int4.convert(random_slim_linear(d_out, d_in, seed=0).to(dev))
    with_ad = random_slim_linear(d_out, d_in, rank=rank, group_size=0, seed=1).to(dev)
    ad_int4 = cuda_int4.convert(with_ad, adapters="int4")
    ad_16 = cuda_int4.convert(with_ad, adapters="16bit")
    ad_16.lora_A, ad_16.lora_B = ad_16.lora_A.to(act), ad_16.lora_B.to(act)
    del with_ad
    methods: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {}
    dense16 = torch.randn(d_out, d_in, device=dev, dtype=act)
    methods["cublas_fp16"] = lambda x: F.linear(x, dense16)
    dense_bf = torch.randn(d_out, d_in, device=dev, dtype=torch.bfloat16 if not smoke else act)
    methods["cublas_bf16"] = lambda x: F.linear(x.to(dense_bf.dtype), dense_bf)
    failures = {}
    for name, build in (("torch_int4", torch_int4), ("cusparselt_fp16", cusparselt_fp16)):
        if dev.type != "cuda":
            failures[name] = "needs CUDA"
            continue
        try:
            fn = build(d_out, d_in, dev)
            fn(torch.randn(16, d_in, device=dev, dtype=torch.bfloat16 if name == "torch_int4" else act))
            methods[name] = fn
        except Exception as e:  # an unavailable comparator is reported, not fatal
            failures[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    rows = []
    for t in tokens:
        x = torch.randn(t, d_in, device=dev, dtype=act)
        xb = x.to(torch.bfloat16) if dev.type == "cuda" else x
        row: dict[str, Any] = {"d_out": d_out, "d_in": d_in, "tokens": t, "rank": rank, "us": {},
                               "unavailable": dict(failures)}
        for name, fn in methods.items():
            row["us"][name] = 1e6 * timer(lambda fn=fn, a=(xb if name == "torch_int4" else x): fn(a))
        for path in ("auto", "gemv", "gemm", "dense"):
            if path == "gemv" and t > GEMV_TOKENS:
                continue
            base.path = path
            row["us"][f"slim_{path}"] = 1e6 * timer(lambda x=x: base(x))
        if t <= VARIANT_TOKENS:  # the other way to build a 2:4 tile for tl.dot (triton_kernels.EXPAND)
            kern = cuda_int4.kernels()
            default, other = kern.EXPAND, "split4" if kern.EXPAND == "group" else "group"
            base.path = "gemm"
            kern.EXPAND = other
            try:
                row["us"][f"slim_gemm[{other}]"] = 1e6 * timer(lambda x=x: base(x))
            finally:
                kern.EXPAND = default
        base.path = "auto"
        row["auto_path"] = cuda_int4.kernels().choose_path(t)
        row["us"]["slim+int4_adapters"] = 1e6 * timer(lambda x=x: ad_int4(x))
        row["us"]["slim+16bit_adapters"] = 1e6 * timer(lambda x=x: ad_16(x))
        row["slim_bytes"] = slim_bytes(base, t)
        row["slim_gbps"] = row["slim_bytes"] / (row["us"]["slim_auto"] * 1e-6) / 1e9
        fp16 = row["us"]["cublas_fp16"]
        row["speedup_vs_fp16"] = {k: fp16 / v for k, v in row["us"].items() if k.startswith("slim")}
        if "torch_int4" in row["us"]:
            row["speedup_vs_torch_int4"] = row["us"]["torch_int4"] / row["us"]["slim_auto"]
        rows.append(row)
    return rows


SWEEP_SHAPES = [(11008, 4096), (28672, 8192)]
GEMV_SWEEP = [{"BN": bn, "BW": bw, "num_warps": w} for bn, bw, w in ((64, 8, 4), (128, 8, 4), (64, 16, 4),
                                                                     (128, 8, 8), (256, 8, 8))]
GEMM_SWEEP = [{"BN": bn, "BK": bk, "num_warps": w} for bn, bk, w in ((64, 64, 4), (128, 64, 4), (256, 64, 8),
                                                                     (128, 128, 8))]


def sweep_rows(dev: torch.device, timer: Timer, smoke: bool) -> list[dict]:
    """The 2:4 layer's GEMV (1 token) and GEMM (16 tokens) under each block configuration that the SASS count
    (benchmarks/triton_sass.py) left in the running: which one the defaults should be."""
    kern = cuda_int4.kernels()
    rows = []
    for d_out, d_in in (SMOKE_SHAPES["smoke"] if smoke else SWEEP_SHAPES):
        mod = cuda_int4.convert(random_slim_linear(d_out, d_in, seed=2).to(dev))
        act = torch.float32 if smoke else torch.float16
        for path, tokens, configs in (("gemv", 1, GEMV_SWEEP), ("gemm", 16, GEMM_SWEEP)):
            mod.path = path
            x = torch.randn(tokens, d_in, device=dev, dtype=act)
            for cfg in configs:
                saved = copy.deepcopy((kern.GEMV_CONFIG, kern.GEMM_CONFIG))
                if path == "gemv":
                    kern.GEMV_CONFIG["2:4"] = cfg
                else:
                    kern.GEMM_CONFIG = cfg
                try:
                    us = 1e6 * timer(lambda x=x, mod=mod: mod(x))
                    rows.append({"d_out": d_out, "d_in": d_in, "path": path, "tokens": tokens, "config": cfg,
                                 "us": us})
                except Exception as e:  # a configuration that does not fit (registers, shared memory) is a finding
                    rows.append({"d_out": d_out, "d_in": d_in, "path": path, "tokens": tokens, "config": cfg,
                                 "error": f"{type(e).__name__}: {str(e)[:200]}"})
                finally:
                    kern.GEMV_CONFIG, kern.GEMM_CONFIG = saved
    return rows


def build_llama(blocks: int, dev: torch.device, smoke: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if smoke:
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=blocks,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    else:  # Llama-2-7B blocks
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=blocks,
                          num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    dtype = torch.float32 if smoke else torch.bfloat16
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def to_slim(model: torch.nn.Module, dev: torch.device, rank_frac: float) -> None:
    """Every block linear replaced by a random 2:4 + 4-bit `cuda-int4` layer (one conversion per shape, copied per
    block so that no two layers share memory)."""
    from slim.models import set_submodule

    made: dict[tuple[int, int], torch.nn.Module] = {}
    for name, lin in [(n, m) for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)]:
        key = (lin.out_features, lin.in_features)
        if key not in made:
            rank = int(rank_frac * min(key))
            made[key] = cuda_int4.convert(random_slim_linear(*key, rank=rank, seed=len(made)).to(dev))
        set_submodule(model.model.layers, name, copy.deepcopy(made[key]))
    cuda_int4.prepare_model(model)


def decode_rows(dev: torch.device, blocks: int, prompt: int, new: int, smoke: bool, budget_left: Callable[[], float],
                log: Callable[[str], None]) -> list[dict]:
    from slim.runtime.generate import generate

    rows = []
    for label, rank_frac in (("dense bf16", None), ("slim 2:4+4-bit", 0.0), ("slim 2:4+4-bit + rank-0.1 int4", 0.1)):
        model = build_llama(blocks, dev, smoke)
        if rank_frac is not None:
            to_slim(model, dev, rank_frac)
        ids = torch.randint(0, model.config.vocab_size, (1, prompt), device=dev)
        for compiled in (False, True):
            if budget_left() < (60 if compiled else 20):
                rows.append({"model": label, "compiled": compiled, "skipped": "time budget"})
                continue
            torch._dynamo.reset()
            try:
                res = generate(model, None, ids, max_new_tokens=new, stop_at_eos=False, compile=compiled)
                res = generate(model, None, ids, max_new_tokens=new, stop_at_eos=False, compile=compiled)  # warm
                row = {"model": label, "compiled": compiled, "blocks": blocks, "prompt": prompt, "new": new,
                       "decode_tokens_per_s": res["decode_tokens_per_s"],
                       "prefill_tokens_per_s": res["prefill_tokens_per_s"]}
            except Exception as e:  # a path that fails is reported with its error, the rest still runs
                row = {"model": label, "compiled": compiled, "error": f"{type(e).__name__}: {e}"[:400]}
                log(traceback.format_exc())
            rows.append(row)
            log(f"e2e {label} compiled={compiled}: {row.get('decode_tokens_per_s', row.get('error'))}")
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for r in rows:
        base = next((d for d in rows if d["model"] == "dense bf16" and d["compiled"] == r["compiled"]
                     and d.get("decode_tokens_per_s")), None)
        if base and r.get("decode_tokens_per_s"):
            r["speedup_vs_dense"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    return rows


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# GPU run time: slim `cuda-int4` against cuBLAS, torch int4 and cuSPARSELt\n",
             f"Machine: {m.get('gpu') or 'no GPU (smoke run)'}; {m['cpu']}; torch {m['torch']}, "
             f"Triton {res.get('triton')}; commit {res['commit']}. Command: `{res['command']}`.",
             f"Copy bandwidth (read + write): {res['copy_gbps']:.0f} GB/s." if res.get("copy_gbps") else "",
             "Microseconds, medians, L2 flushed before each repetition; speed-up = cuBLAS fp16 time / slim time.\n",
             "| shape (out x in) | tokens | cuBLAS fp16 | cuBLAS bf16 | torch int4 | cuSPARSELt 2:4 | slim (path) "
             "| slim + int4 adapters | slim + 16-bit adapters | x fp16 | x torch int4 | slim GB/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    for r in res["layers"]:
        us = r["us"]
        lines.append(
            f"| {r['d_out']}x{r['d_in']} | {r['tokens']} | {f(us.get('cublas_fp16'))} | {f(us.get('cublas_bf16'))} "
            f"| {f(us.get('torch_int4'))} | {f(us.get('cusparselt_fp16'))} | {f(us['slim_auto'])} ({r['auto_path']}) "
            f"| {f(us['slim+int4_adapters'])} | {f(us['slim+16bit_adapters'])} "
            f"| {r['speedup_vs_fp16']['slim_auto']:.2f} | "
            f"{'-' if 'speedup_vs_torch_int4' not in r else format(r['speedup_vs_torch_int4'], '.2f')} "
            f"| {r['slim_gbps']:.0f} |")
    lines += ["\nForced paths (microseconds): where the GEMV/GEMM/dequantize crossovers lie.\n",
              f"| shape | tokens | GEMV | GEMM ({res['kernel']['expand']} expansion) | GEMM (other expansion) "
              "| dequantize + cuBLAS |", "|---|---|---|---|---|---|"]
    for r in res["layers"]:
        us = r["us"]
        other = next((v for k, v in us.items() if k.startswith("slim_gemm[")), None)
        lines.append(f"| {r['d_out']}x{r['d_in']} | {r['tokens']} | {f(us.get('slim_gemv'))} | "
                     f"{f(us.get('slim_gemm'))} | {f(other)} | {f(us.get('slim_dense'))} |")
    if res.get("sweep"):
        lines += ["\nBlock configurations (2:4 layer, microseconds): GEMV at 1 token, GEMM at 16.\n",
                  "| shape | path | config | us |", "|---|---|---|---|"]
        for r in res["sweep"]:
            cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items())
            us = f(r["us"]) if "us" in r else r["error"]
            lines.append(f"| {r['d_out']}x{r['d_in']} | {r['path']} | {cfg} | {us} |")
    if res.get("decode"):
        lines += ["\nEnd to end: greedy decode of a random Llama with Llama-2-7B blocks.\n",
                  "| model | loop | decode tok/s | x dense (same loop) |", "|---|---|---|---|"]
        for r in res["decode"]:
            loop = "compiled (static cache)" if r["compiled"] else "eager"
            tps = r.get("decode_tokens_per_s")
            sp = r.get("speedup_vs_dense")
            lines.append(f"| {r['model']} | {loop} | {f(tps) if tps else r.get('error') or r.get('skipped')} "
                         f"| {'-' if sp is None else format(sp, '.2f')} |")
    unavailable = {k: v for r in res["layers"] for k, v in r.get("unavailable", {}).items()}
    if unavailable:
        lines.append("\nNot measured: " + "; ".join(f"{k} ({v})" for k, v in unavailable.items()))
    return "\n".join(x for x in lines if x is not None) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for gpu.json and gpu.md")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device is here (checks the script)")
    ap.add_argument("--blocks", type=int, default=4, help="Llama-2-7B-shaped blocks in the end-to-end model (4)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens end to end (32)")
    ap.add_argument("--new", type=int, default=128, help="decoded tokens end to end (128)")
    ap.add_argument("--budget-s", type=float, default=450, help="stop starting new measurements after this (450)")
    ap.add_argument("--rep-ms", type=int, default=60, help="do_bench repetition time per measurement, ms (60)")
    ap.add_argument("--shapes", default="all", help="comma-separated groups of SHAPES (llama2-7b,llama3-8b,70b)")
    ap.add_argument("--no-e2e", action="store_true", help="layer-wise only")
    args = ap.parse_args()
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    why = cuda_int4.available(dev.type)
    if why is not None:
        raise SystemExit(f"gpu_runtime: cuda-int4 cannot run here: {why}")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    groups = list(shapes) if args.shapes == "all" else args.shapes.split(",")
    unknown = [g for g in groups if g not in shapes]
    if unknown:
        raise SystemExit(f"gpu_runtime: unknown shape groups {unknown}; choose from {list(shapes)}")
    tokens = SMOKE_TOKENS if args.smoke else TOKENS
    timer = Timer(dev.type == "cuda", args.rep_ms)
    import triton

    res: dict[str, Any] = {"machine": machine(), "commit": source_commit(), "triton": triton.__version__,
                           "command": "python benchmarks/gpu_runtime.py " + " ".join(sys.argv[1:]),
                           "kernel": cuda_int4.describe(), "copy_gbps": None, "layers": [], "sweep": [], "decode": [],
                           "skipped": []}

    def save() -> None:
        res["seconds"] = time.perf_counter() - t0
        write_json(out / "gpu.json", res)
        (out / "gpu.md").write_text(markdown(res))

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    bw = copy_bandwidth(dev)
    res["copy_gbps"] = None if bw is None else bw / 1e9
    log(f"device {dev} ({res['machine'].get('gpu')}), copy bandwidth {res['copy_gbps']}")
    budget_left = lambda: args.budget_s - (time.perf_counter() - t0)  # noqa: E731
    e2e_reserve = 0 if args.no_e2e else (20 if args.smoke else 200)
    with torch.no_grad():
        for g in groups:
            for d_out, d_in in shapes[g]:
                if budget_left() < e2e_reserve:
                    res["skipped"].append(f"{d_out}x{d_in}: time budget")
                    continue
                rows = layer_rows(d_out, d_in, tokens, dev, timer, args.smoke)
                res["layers"] += rows
                save()
                log(f"{d_out}x{d_in}: " + ", ".join(f"{r['tokens']} tok {r['speedup_vs_fp16']['slim_auto']:.2f}x"
                                                      for r in rows))
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        if budget_left() > e2e_reserve + (5 if args.smoke else 60):
            res["sweep"] = sweep_rows(dev, timer, args.smoke)
            save()
            log("block-configuration sweep done")
        if not args.no_e2e:
            res["decode"] = decode_rows(dev, 2 if args.smoke else args.blocks, 8 if args.smoke else args.prompt,
                                        6 if args.smoke else args.new, args.smoke, budget_left, log)
    save()
    print(markdown(res))


if __name__ == "__main__":
    main()
