"""End-to-end speed and memory: a slim checkpoint through its backend against the dense bf16 model.

Speed: one process loads both models and alternates them (dense, slim, dense, ...) for --reps rounds, each round a
prefill of --prompt-tokens tokens and a greedy decode of --new-tokens tokens; the speed-ups are medians of the
per-round ratios, so the shared machine's drift hits both models alike. Memory: each model again in a fresh process
(so resident memory belongs to that model alone): import torch, transformers, slim and the model's modeling code (a
meta-device model: ~150 MB of library code, the same for every model), read the resident memory, load, warm up,
prefill and decode once, and read the peak resident memory. Model memory = peak minus the memory before loading.

Models: SmolLM2-135M (the default slim checkpoint, --checkpoint, against its dense bf16 safetensors directory,
written from the bundled GGUF if missing) and a random-weight Llama with Llama-2-7B block shapes (--random-blocks
blocks, small vocabulary), compressed in the default recipe's stored layout (2:4 + 4-bit per-tensor codes,
rank-0.1 int4 adapters) with random contents: speed does not depend on the values.

    python benchmarks/runtime_e2e.py --out docs/results/runtime --checkpoint runs/smollm2-slim --work runs/e2e
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------ worker (one model, one process)


def _prompt(args: argparse.Namespace, model: str):  # noqa: ANN202
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    ids = torch.randint(0, config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    if (Path(model) / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        from slim.data import wikitext2_rows

        tok = AutoTokenizer.from_pretrained(model)
        text = "\n\n".join(wikitext2_rows(args.data_dir)[0][:400])
        ids = tok(text, return_tensors="pt").input_ids[:, : args.prompt_tokens]
    return config, ids


def _load(model: str, backend: str):  # noqa: ANN202
    import torch
    from transformers import AutoModelForCausalLM

    import slim
    from slim.format.checkpoint import is_checkpoint

    if is_checkpoint(model):
        return slim.load(model, backend=backend), f"slim ({backend})"
    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval(), "dense bf16"


def memory_worker(args: argparse.Namespace) -> None:
    """One model alone in this process: load, warm up, one prefill + decode; the memory figures."""
    import torch
    import transformers  # noqa: F401 - counted in the baseline, as a user's process has it

    from slim.format.checkpoint import release_free_memory
    from slim.runtime import model_bytes
    from slim.runtime.generate import generate, peak_rss_bytes, reset_peak_rss, rss_bytes

    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    config, ids = _prompt(args, args.model)  # the prompt is ready before the baseline is read
    with torch.device("meta"):  # import the modeling code now (~150 MB of library, the same for every model)
        AutoModelForCausalLM.from_config(config)
    release_free_memory()
    reset_peak_rss()  # the peak counts from here: the model's load, prefill and decode
    base = rss_bytes()
    t0 = time.perf_counter()
    model, kind = _load(args.model, args.backend)
    load_s = time.perf_counter() - t0
    loaded = rss_bytes()
    peak_load = peak_rss_bytes()
    generate(model, None, ids[:, :8], max_new_tokens=2, stop_at_eos=False)  # warm-up
    generate(model, None, ids, max_new_tokens=args.new_tokens + 1, stop_at_eos=False)
    print(json.dumps({
        "model": args.model, "kind": kind, "load_seconds": load_s, "prompt_tokens": int(ids.shape[1]),
        "new_tokens": args.new_tokens, "rss_before_load": base, "rss_after_load": loaded,
        "peak_rss": peak_rss_bytes(), "model_memory_bytes": peak_rss_bytes() - base,
        "loaded_memory_bytes": loaded - base,
        "load_peak_memory_bytes": peak_load - base, "param_bytes": model_bytes(model)["total_bytes"],
        "activations": getattr(model, "slim_backend", {}).get("activations", "as stored"),
    }))


def speed_worker(args: argparse.Namespace) -> None:
    """Both models in this process, alternated round by round: prefill and decode tokens/s of each."""
    import torch

    from slim.runtime.generate import generate

    torch.manual_seed(0)
    _, ids = _prompt(args, args.model)
    models = [_load(args.model, "auto"), _load(args.compressed, args.backend)]
    for m, _ in models:
        generate(m, None, ids[:, :8], max_new_tokens=2, stop_at_eos=False)  # warm-up
    runs: list[list[dict]] = [[], []]
    for _ in range(args.reps):
        for i, (m, _) in enumerate(models):
            r = generate(m, None, ids, max_new_tokens=args.new_tokens + 1, stop_at_eos=False)
            runs[i].append({k: r[k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s")})
    d, c = runs

    def ratio(key: str) -> float:
        return statistics.median(b[key] / a[key] for a, b in zip(d, c, strict=True))

    print(json.dumps({
        "kinds": [k for _, k in models], "prompt_tokens": int(ids.shape[1]), "new_tokens": args.new_tokens,
        "reps": args.reps, "dense": d, "slim": c,
        "dense_prefill_tokens_per_s": statistics.median(r["prefill_tokens_per_s"] for r in d),
        "slim_prefill_tokens_per_s": statistics.median(r["prefill_tokens_per_s"] for r in c),
        "dense_decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in d),
        "slim_decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in c),
        "prefill_speedup": ratio("prefill_tokens_per_s"), "decode_speedup": ratio("decode_tokens_per_s"),
    }))


# ------------------------------------------------------------------ preparing the models


def dir_bytes(p: Path) -> int:
    from slim.format.checkpoint import dir_bytes as nbytes

    return nbytes(p)


def smollm2_dense_dir(work: Path) -> Path:
    """The bundled SmolLM2 GGUF as a bf16 safetensors directory (what a user downloads as the dense model)."""
    d = work / "smollm2-dense-bf16"
    if not (d / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM

        from slim.models import load_model

        model, tok, _ = load_model(None)
        cfg = model.config
        if hasattr(cfg, "quantization_config"):  # the GGUF marker: the weights are dequantized already
            del cfg.quantization_config
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(d)
        tok.save_pretrained(d)
    return d


def random_llama_dirs(work: Path, blocks: int) -> tuple[Path, Path]:
    """A random Llama with Llama-2-7B blocks (dense bf16 dir) and its slim checkpoint in the default layout."""
    dense, ck = work / f"llama7b-shape-{blocks}b-dense-bf16", work / f"llama7b-shape-{blocks}b-slim"
    if (dense / "config.json").exists() and (ck / "slim_config.json").exists():
        return dense, ck
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import slim
    from slim.models import set_submodule
    from slim.testing.random_layers import random_slim_linear

    cfg = LlamaConfig(vocab_size=4096, hidden_size=4096, intermediate_size=11008, num_hidden_layers=blocks,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(dense)
    seed = 0
    for name, mod in list(model.model.layers.named_modules()):
        if isinstance(mod, torch.nn.Linear):
            d_out, d_in = mod.weight.shape
            set_submodule(model.model.layers, name, random_slim_linear(
                d_out, d_in, rank=round(0.1 * min(d_out, d_in)), seed=seed))
            seed += 1
    slim.save(model, ck, meta={"note": "random contents in the default recipe's layout (speed benchmark)"},
              overwrite=True)
    return dense, ck


def run_worker(mode: str, model: Path, backend: str, prompt: int, new: int, reps: int, data_dir: str | None,
               compressed: Path | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), mode, "--model", str(model), "--backend", backend,
           "--prompt-tokens", str(prompt), "--new-tokens", str(new), "--reps", str(reps)]
    if compressed:
        cmd += ["--compressed", str(compressed)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{mode} failed for {model}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(name: str, dense: Path, ck: Path, backend: str, prompt: int, new: int, reps: int,
            data_dir: str | None) -> dict:
    print(f"{name}: prompt {prompt} tokens, {new} new tokens, {reps} alternating rounds", flush=True)
    sp = run_worker("speed", dense, backend, prompt, new, reps, data_dir, compressed=ck)
    print(f"  decode {sp['dense_decode_tokens_per_s']:.2f} -> {sp['slim_decode_tokens_per_s']:.2f} tok/s "
          f"({sp['decode_speedup']:.2f}x), prefill {sp['dense_prefill_tokens_per_s']:.1f} -> "
          f"{sp['slim_prefill_tokens_per_s']:.1f} tok/s ({sp['prefill_speedup']:.2f}x)", flush=True)
    d = run_worker("memory", dense, "auto", prompt, new, 1, data_dir)
    c = run_worker("memory", ck, backend, prompt, new, 1, data_dir)
    print(f"  model memory {d['model_memory_bytes'] / 2**20:.1f} -> {c['model_memory_bytes'] / 2**20:.1f} MiB",
          flush=True)
    return {
        "name": name, "speed": sp, "dense": d, "slim": c, "dense_dir_bytes": dir_bytes(dense),
        "slim_dir_bytes": dir_bytes(ck), "decode_speedup": sp["decode_speedup"],
        "prefill_speedup": sp["prefill_speedup"], "memory_ratio": c["model_memory_bytes"] / d["model_memory_bytes"],
        "disk_ratio": dir_bytes(ck) / dir_bytes(dense),
    }


def table(res: dict) -> str:
    from grid import describe_machine

    mib = 2**20
    lines = [
        "# End to end: slim checkpoint vs dense bf16\n",
        f"Machine: {describe_machine(res['machine'])}. Commit {res['commit']}. Backend `{res['backend']}`. Speed: "
        "both models in one process, alternated round by round, greedy decoding; speed-up = median of the per-round "
        "ratios, tokens/s = medians. Memory: each model alone in a fresh process; model memory = peak resident "
        "memory minus the resident memory after importing torch/transformers/slim and the modeling code (load, "
        "prefill and decode included).\n",
        "| model | prompt | new | dense prefill tok/s | slim prefill tok/s | **prefill ×** | dense decode tok/s "
        "| slim decode tok/s | **decode ×** | dense memory MiB | slim memory MiB | **memory ratio** | dense dir MiB "
        "| slim dir MiB | **disk ratio** |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        d, c, sp = r["dense"], r["slim"], r["speed"]
        lines.append(
            f"| {r['name']} | {sp['prompt_tokens']} | {sp['new_tokens']} | {sp['dense_prefill_tokens_per_s']:.1f} | "
            f"{sp['slim_prefill_tokens_per_s']:.1f} | **{r['prefill_speedup']:.2f}×** | "
            f"{sp['dense_decode_tokens_per_s']:.2f} | {sp['slim_decode_tokens_per_s']:.2f} | "
            f"**{r['decode_speedup']:.2f}×** | {d['model_memory_bytes'] / mib:.1f} | "
            f"{c['model_memory_bytes'] / mib:.1f} | **{r['memory_ratio']:.3f}** | {r['dense_dir_bytes'] / mib:.1f} | "
            f"{r['slim_dir_bytes'] / mib:.1f} | **{r['disk_ratio']:.3f}** |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("speed", "memory"):
        wp = argparse.ArgumentParser()
        wp.add_argument("mode")
        wp.add_argument("--model", required=True)
        wp.add_argument("--compressed")
        wp.add_argument("--backend", default="auto")
        wp.add_argument("--prompt-tokens", type=int, default=512)
        wp.add_argument("--new-tokens", type=int, default=32)
        wp.add_argument("--reps", type=int, default=3)
        wp.add_argument("--data-dir")
        wargs = wp.parse_args()
        (speed_worker if wargs.mode == "speed" else memory_worker)(wargs)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (e2e.json + e2e.md)")
    ap.add_argument("--checkpoint", help="the SmolLM2 slim checkpoint (e.g. from `make demo`); skipped if not given")
    ap.add_argument("--work", default="runs/e2e", help="where the dense bf16 and random models are written")
    ap.add_argument("--backend", default="auto", help="backend of the slim models (auto)")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="SmolLM2 prefill length (512)")
    ap.add_argument("--new-tokens", type=int, default=64, help="SmolLM2 decode length (64)")
    ap.add_argument("--short-prompt-tokens", type=int, default=32, help="a second SmolLM2 run, short prompt (32; 0 = "
                    "skip)")
    ap.add_argument("--short-new-tokens", type=int, default=128, help="its decode length (128)")
    ap.add_argument("--random-blocks", type=int, default=3, help="blocks of the 7B-shaped random Llama (0 = skip)")
    ap.add_argument("--random-prompt-tokens", type=int, default=64, help="its prefill length (64)")
    ap.add_argument("--random-new-tokens", type=int, default=16, help="its decode length (16)")
    ap.add_argument("--reps", type=int, default=5, help="alternating speed rounds (median; 5)")
    ap.add_argument("--data-dir", help="data folder (WikiText-2 for the prompt)")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from grid import machine, source_commit

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.checkpoint:
        dense = smollm2_dense_dir(work)
        rows.append(compare("SmolLM2-135M (default recipe)", dense, Path(args.checkpoint), args.backend,
                            args.prompt_tokens, args.new_tokens, args.reps, args.data_dir))
        if args.short_prompt_tokens:
            rows.append(compare("SmolLM2-135M (default recipe), short prompt", dense, Path(args.checkpoint),
                                args.backend, args.short_prompt_tokens, args.short_new_tokens, args.reps,
                                args.data_dir))
    if args.random_blocks:
        dense, ck = random_llama_dirs(work, args.random_blocks)
        rows.append(compare(f"random Llama, 7B blocks × {args.random_blocks}", dense, ck, args.backend,
                            args.random_prompt_tokens, args.random_new_tokens, args.reps, args.data_dir))
    res = {"machine": machine(), "commit": source_commit(), "backend": args.backend, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from slim.format.checkpoint import write_json

    write_json(out / "e2e.json", res)
    (out / "e2e.md").write_text(table(res))
    print(f"wrote {out / 'e2e.md'}")


if __name__ == "__main__":
    main()
