"""What slim's Triton kernels cost per weight on a Hopper GPU, read from their machine code, without a GPU.

Each kernel variant and block configuration is compiled ahead of time for sm_90 (Triton's own ptxas), and its main
loop's instructions are counted from the SASS (`cuobjdump`, shipped with Triton) and divided by the weights one
thread handles per iteration; registers and spilled bytes come from the resource report. At one token a layer is
bound by this count long before memory (an H100 issues about 128 thread-instructions per clock per SM: 14 a kept
weight on a 4096 x 11008 layer is ~11 us against the ~6 us its 17 MB take to read), so it is the number to drive
down between GPU runs, and the one that chose the default configurations. It is a proxy: latency, occupancy and
the memory system are what `benchmarks/gpu_runtime.py` measures on a GPU.

    python benchmarks/triton_sass.py --out docs/results/runtime/sass
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from slim.format.checkpoint import write_json

TYPES = {"x_ptr": "*bf16", "qv_ptr": "*i32", "qp_ptr": "*i16", "s_ptr": "*fp32", "z_ptr": "*fp32", "ts_ptr": "*fp32",
         "b_ptr": "*bf16", "acc_ptr": "*bf16", "y_ptr": "*bf16", "out_ptr": "*bf16"}


def _kernels():  # noqa: ANN202 - imported here, after `main` clears TRITON_INTERPRET, so the kernels compile
    from slim.kernels import triton as triton_kernels

    if not isinstance(triton_kernels._gemv_kernel, triton.runtime.JITFunction):
        raise SystemExit("triton_sass: the kernels were imported under TRITON_INTERPRET=1; run this script in a "
                         "process of its own")
    return triton_kernels


def variants() -> list[dict[str, Any]]:
    """The kernel variants and configurations to compile: the defaults first, then the alternatives."""
    tk = _kernels()
    out = []
    for sparse in (True, False):
        gv = tk.GEMV_CONFIG["2:4" if sparse else "dense"]
        for group in (0, 128):
            for bn, bw, warps in sorted({(gv["BN"], gv["BW"], gv["num_warps"]), (64, 8, 4), (128, 8, 4),
                                         (64, 16, 4), (128, 8, 8)}):
                out.append(dict(kernel="gemv", sparse=sparse, group=group, BN=bn, BW=bw, num_warps=warps,
                                default=(bn, bw, warps) == (gv["BN"], gv["BW"], gv["num_warps"])))
    gm = tk.GEMM_CONFIG
    for sparse, expands in ((True, ("group", "split4", "select")), (False, ("group",))):
        for expand in expands:
            for bm in (16, 64):
                for bn, bk, warps in sorted({(gm["BN"], gm["BK"], gm["num_warps"]), (64, 64, 4), (128, 64, 4),
                                             (128, 128, 8), (256, 64, 8)}):
                    if expand == "select" and (bn, bk) != (64, 64):
                        continue
                    default = (expand == tk.EXPAND or not sparse) and (bn, bk, warps) == (
                        gm["BN"], gm["BK"], gm["num_warps"])
                    out.append(dict(kernel="gemm", sparse=sparse, group=128, expand=expand, BM=bm, BN=bn, BK=bk,
                                    num_warps=warps, default=default))
    return out


def compile_variant(v: dict[str, Any], target: GPUTarget) -> Any:
    tk = _kernels()
    fn = {"gemv": tk._gemv_kernel, "gemm": tk._gemm_kernel}[v["kernel"]]
    names = list(inspect.signature(fn.fn).parameters)
    consts = dict(SPARSE=v["sparse"], GROUP=v["group"], HAS_Z=False, HAS_BIAS=False, HAS_ACC=False, ATOMIC=False,
                  BN=v["BN"])
    if v["kernel"] == "gemv":
        consts |= dict(BW=v["BW"], EVEN_K=True)
    else:
        consts |= dict(DOT=tl.bfloat16, EXPAND=tk.EXPANSIONS[v["expand"]], BM=v["BM"], BK=v["BK"])
    sig = {n: "constexpr" if n in consts else TYPES.get(n, "i32") for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): c for n, c in consts.items()})
    return triton.compile(src, target=target, options={"num_warps": v["num_warps"]})


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def analyse(compiled: Any) -> dict[str, Any]:
    """Registers, spills, and the main loop's instruction count and mix from the cubin."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "k.cubin"
        p.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(p)], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", str(p)], capture_output=True, text=True,
                              check=True).stdout
    reg, stack = (int(x) for x in re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    ins = [(int(m.group(1), 16), m.group(2).strip()) for line in sass.splitlines()
           if (m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line))]
    loops = []
    for addr, txt in ins:
        m = re.search(r"BRA\b.*?0x([0-9a-f]+)", txt)
        if m and int(m.group(1), 16) < addr:
            loops.append([t for a, t in ins if int(m.group(1), 16) <= a <= addr])
    body = max(loops, key=len) if loops else []
    mix: dict[str, int] = {}
    for t in body:
        op = (t.split()[1] if t.startswith("@") else t.split()[0]).split(".")[0]
        mix[op] = mix.get(op, 0) + 1
    return {"registers": reg, "stack_bytes": stack, "loop_instructions": len(body),
            "loop_mix": dict(sorted(mix.items(), key=lambda kv: -kv[1])[:8])}


def weights_per_thread(v: dict[str, Any]) -> float:
    """Weights one thread handles per loop iteration: kept values (2:4 GEMV), else dense positions."""
    if v["kernel"] == "gemv":
        return v["BW"] * 8 * v["BN"] / (32 * v["num_warps"])
    return v["BK"] * v["BN"] / (32 * v["num_warps"])


def run(arch: int = 90, defaults_only: bool = False) -> list[dict[str, Any]]:
    target = GPUTarget("cuda", arch, 32)
    rows = []
    for v in variants():
        if defaults_only and not v["default"]:
            continue
        row = dict(v)
        try:
            row |= analyse(compile_variant(v, target))
            row["per_weight"] = row["loop_instructions"] / weights_per_thread(v)
        except Exception as e:  # a configuration that does not compile is a finding, not a crash
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# slim's Triton kernels on sm_{meta['arch']}: instructions per weight, from the SASS\n",
             f"Triton {meta['triton']}, compiled ahead of time (no GPU); command `{meta['command']}`. Per weight: "
             "the main loop's instructions over the weights one thread handles per iteration (kept values for the "
             "2:4 GEMV, dense positions otherwise); bf16 activations. **bold**: the configuration in use.\n",
             "| kernel | weights | group | expansion | BM | BN | BK/BW | warps | per weight | registers "
             "| spill bytes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pw = "error" if "error" in r else f"{r['per_weight']:.1f}"
        if r.get("default"):
            pw = f"**{pw}**"
        lines.append(f"| {r['kernel']} | {'2:4' if r['sparse'] else 'dense int4'} | {r['group'] or 'tensor'} "
                     f"| {r.get('expand', '-')} | {r.get('BM', 1)} | {r['BN']} | {r.get('BK', r.get('BW'))} "
                     f"| {r['num_warps']} | {pw} | {r.get('registers', '-')} | {r.get('stack_bytes', '-')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="directory for sass.json and sass.md (else print the table)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 to compile for (90: H100/H200)")
    ap.add_argument("--defaults-only", action="store_true", help="only the configurations in use (a quick check)")
    args = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)  # compile for real, even from the test suite's environment
    rows = run(args.arch, args.defaults_only)
    meta = {"arch": args.arch, "triton": triton.__version__,
            "command": "python benchmarks/triton_sass.py " + " ".join(sys.argv[1:])}
    text = markdown(rows, meta)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "sass.json", {**meta, "rows": rows})
        (out / "sass.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
