"""Peak resident memory and time of `slim compress` against depth, on random Llamas with 7B block shapes (hidden
4096, MLP 11008) of 2, 4 and 8 blocks and one 70B-shaped block (hidden 8192, MLP 28672, 8 KV heads), written as
sharded bf16 safetensors and compressed block by block from disk (`--load stream`), plus the deepest one loaded
whole (`--load memory`) for comparison.

Each run is its own process (`slim compress` through `slim.cli.main`), which reports its own peak resident memory
(VmHWM) at exit; its time from slim_config.json (calibration capture and every block, without
Python's start-up). Time per block is the slope between the shallowest and the deepest model, which removes the
fixed costs (start-up, embeddings, assembling the checkpoint).

    python benchmarks/compress_scale.py --out docs/results/scale --work runs/scale
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


def write_model(d: Path, hidden: int, mlp: int, blocks: int, heads: int, kv_heads: int, vocab: int) -> int:
    """A random bf16 Llama as sharded safetensors, built one block at a time (never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    d.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=blocks,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                      tie_word_embeddings=False, dtype="bfloat16")
    g = torch.Generator().manual_seed(0)
    hd = hidden // heads

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).bfloat16()

    shards: list[dict[str, torch.Tensor]] = [{
        "model.embed_tokens.weight": rnd(vocab, hidden), "model.norm.weight": torch.ones(hidden).bfloat16(),
        "lm_head.weight": rnd(vocab, hidden)}]
    for i in range(blocks):
        p = f"model.layers.{i}."
        shards.append({
            p + "self_attn.q_proj.weight": rnd(heads * hd, hidden),
            p + "self_attn.k_proj.weight": rnd(kv_heads * hd, hidden),
            p + "self_attn.v_proj.weight": rnd(kv_heads * hd, hidden),
            p + "self_attn.o_proj.weight": rnd(hidden, heads * hd),
            p + "mlp.gate_proj.weight": rnd(mlp, hidden), p + "mlp.up_proj.weight": rnd(mlp, hidden),
            p + "mlp.down_proj.weight": rnd(hidden, mlp),
            p + "input_layernorm.weight": torch.ones(hidden).bfloat16(),
            p + "post_attention_layernorm.weight": torch.ones(hidden).bfloat16()})
    weight_map, total = {}, 0
    for j, sd in enumerate(shards):
        name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sd, str(d / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(sd, name))
        total += sum(t.numel() * t.element_size() for t in sd.values())
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                "weight_map": weight_map}))
    from transformers import AutoTokenizer

    from slim.models import bundled_gguf

    g = bundled_gguf()  # SmolLM2's tokenizer (49152 tokens, the vocabulary these models get)
    AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name).save_pretrained(d)
    cfg.save_pretrained(d)  # last: a folder with config.json is a complete model (an interrupted write is redone)
    return total


def compress(src: Path, out: Path, args: argparse.Namespace, load: str) -> dict:
    from slim.format.checkpoint import dir_bytes

    # the child reports its own peak (VmHWM, since exec): a fork's rusage starts from this process's size
    wrapper = ("import sys\nfrom slim.cli.commands import main\nrc = main(sys.argv[1:])\nprint('VmHWM', open("
               "'/proc/self/status').read().split('VmHWM:')[1].split()[0], flush=True)\nsys.exit(rc)")
    cmd = [sys.executable, "-c", wrapper, "compress", str(src), "--out", str(out), "--overwrite", "--load", load,
           "--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen),
           "--set", f"calib.batch_size={args.calib_samples}", "-q", *(["--preset", args.preset] if args.preset else []),
           *args.extra.split()]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    t0 = time.perf_counter()
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as f:
        status = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{log.read_text()[-3000:]}")
    hwm_kib = int(log.read_text().rsplit("VmHWM", 1)[1].split()[0])
    rep = json.loads((out / "slim_config.json").read_text())["report"]
    return {"peak_rss_mib": hwm_kib / 1024, "compress_seconds": rep["compress_seconds"], "wall_seconds": wall,
            "checkpoint_mib": dir_bytes(out) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (scale.json + scale.md)")
    ap.add_argument("--work", default="runs/scale", help="where the random models and checkpoints go")
    ap.add_argument("--depths", default="2,4,8", help="7B-shaped depths (2,4,8)")
    ap.add_argument("--no-70b", action="store_true", help="skip the 70B-shaped block")
    ap.add_argument("--no-memory-load", action="store_true",
                    help="skip the deepest model loaded whole (--load memory) for comparison")
    ap.add_argument("--hidden", type=int, default=4096, help="hidden size of the deep models (4096, Llama-2-7B)")
    ap.add_argument("--mlp", type=int, default=11008, help="MLP width of the deep models (11008)")
    ap.add_argument("--calib-samples", type=int, default=8, help="calibration windows (8)")
    ap.add_argument("--calib-seqlen", type=int, default=128, help="tokens per window (128)")
    ap.add_argument("--preset", help="a recipe preset (default: slim's default recipe)")
    ap.add_argument("--extra", default="", help="more `slim compress` options, e.g. '--adapter none'")
    ap.add_argument("--data-dir")
    ap.add_argument("--from-json", action="store_true",
                    help="only re-render OUT/scale.json's runs (summary and table), measuring nothing")
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    label7 = "7B" if (args.hidden, args.mlp) == (4096, 11008) else f"{args.hidden}/{args.mlp}"
    if args.from_json:
        saved = json.loads((out / "scale.json").read_text())
        write_outputs(out, saved["runs"], argparse.Namespace(**{**saved["args"], "from_json": False}), label7,
                      saved.get("commit"))
        return
    runs = []
    shapes = [(label7, args.hidden, args.mlp, int(b), 32, 32) for b in args.depths.split(",")]
    if not args.no_70b:
        shapes.append(("70B", 8192, 28672, 1, 64, 8))
    deepest = max(b for _, _, _, b, _, _ in shapes[: len(args.depths.split(","))])
    for label, hidden, mlp, blocks, heads, kv in shapes:
        src = work / f"{label}-{blocks}"
        if not (src / "config.json").is_file():
            write_model(src, hidden, mlp, blocks, heads, kv, vocab=49152)
        whole = label != "70B" and blocks == deepest and not args.no_memory_load
        loads = ["stream", "memory"] if whole else ["stream"]
        for load in loads:
            print(f"{label} x {blocks} blocks, --load {load} ...", flush=True)
            r = compress(src, work / f"{label}-{blocks}-{load}-ck", args, load)
            r.update({"shape": label, "hidden": hidden, "mlp": mlp, "blocks": blocks, "load": load,
                      "source_mib": sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**20})
            print(f"  peak RSS {r['peak_rss_mib']:.0f} MiB, {r['compress_seconds']:.0f} s", flush=True)
            runs.append(r)
            shutil.rmtree(work / f"{label}-{blocks}-{load}-ck")
    write_outputs(out, runs, args, label7)


def write_outputs(out: Path, runs: list[dict], args: argparse.Namespace, label7: str,
                  commit: str | None = None) -> None:
    """scale.json (runs + the summary derived from them) and scale.md; `commit`: the code that measured them."""
    sys.path.insert(0, str(HERE))
    from grid import describe_machine, machine, source_commit

    from slim.format.checkpoint import write_json

    stream7 = sorted((r for r in runs if r["shape"] == label7 and r["load"] == "stream"), key=lambda r: r["blocks"])
    lo, hi = stream7[0], stream7[-1]
    if hi["blocks"] > lo["blocks"]:
        per_block = (hi["compress_seconds"] - lo["compress_seconds"]) / (hi["blocks"] - lo["blocks"])
    else:  # one depth: fixed costs stay in (small next to a 7B block's)
        per_block = hi["compress_seconds"] / hi["blocks"]
    summary = {"per_block_seconds_7b": per_block,
               "rss_spread_7b": max(r["peak_rss_mib"] for r in stream7) / min(r["peak_rss_mib"] for r in stream7) - 1,
               "projected_llama2_7b_hours": 32 * per_block / 3600}
    big = [r for r in runs if r["shape"] == "70B"]
    if big:
        summary["projected_llama2_70b_hours"] = 80 * big[0]["compress_seconds"] / 3600
    m = machine()
    write_json(out / "scale.json", {"machine": m, "commit": commit or source_commit(), "args": vars(args), "runs": runs,
                                    "summary": summary})
    lines = ["# Compression at scale: memory and time against depth\n", f"Machine: {describe_machine(m)}.",
             f"Calibration {args.calib_samples} x {args.calib_seqlen} tokens, recipe "
             f"{args.preset or 'default'}{' ' + args.extra if args.extra else ''}; random bf16 weights written as "
             "sharded safetensors.\n",
             "| model | blocks | load | source MiB | peak RSS MiB | compress s | checkpoint MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['shape']}-shaped | {r['blocks']} | {r['load']} | {r['source_mib']:.0f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['compress_seconds']:.0f} | {r['checkpoint_mib']:.0f} |")
    lines += ["", f"Peak RSS spread over {label7}-shaped depths (streamed): {100 * summary['rss_spread_7b']:.1f} %.",
              f"Time per {label7}-shaped block (slope between the shallowest and the deepest): {per_block:.0f} s; "
              f"LLaMA-2-7B (32 blocks) projected at {summary['projected_llama2_7b_hours']:.2f} h with this "
              "calibration."]
    if big:
        lines.append(f"70B-shaped block: {big[0]['compress_seconds']:.0f} s, peak RSS {big[0]['peak_rss_mib']:.0f} "
                     f"MiB; LLaMA-2-70B (80 blocks) projected at {summary['projected_llama2_70b_hours']:.1f} h.")
    (out / "scale.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'scale.md'}")


if __name__ == "__main__":
    main()
