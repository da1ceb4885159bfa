"""Every export format of one slim checkpoint, loaded by its third-party loader: logits and WikiText-2 perplexity
against slim's own `reference` backend, and size on disk.

Each format is exported (`slim.export.formats`), loaded the way its model card says (transformers + compressed-tensors;
PEFT over that base; plain transformers) in fp32 (CPUs compute fp16/bf16 slowly; the stored tensors are the
export's), and compared with slim on the same tokens: the max absolute logit difference on the first window and
the perplexity over --limit windows. The compressed-tensors base holds no adapters, so it is compared with slim's
base alone (each layer's dequantized mask · Q(W)); `peft` and `merged` with the whole slim model.

    python benchmarks/export_formats.py --checkpoint runs/smollm2-slim --out docs/results/export --limit 40
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a slim checkpoint (e.g. from `make demo`)")
    ap.add_argument("--out", required=True, help="output folder (export.json + export.md)")
    ap.add_argument("--work", default="runs/exports", help="where the exports are written")
    ap.add_argument("--limit", type=int, default=40, help="WikiText-2 windows (40)")
    ap.add_argument("--seqlen", type=int, default=2048, help="window length (2048)")
    ap.add_argument("--dtype", default="fp16", help="export dtype (fp16)")
    ap.add_argument("--data-dir", help="data folder")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    import torch
    from grid import describe_machine, machine, source_commit
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    import slim
    from slim.data import wikitext2_ids
    from slim.eval.perplexity import perplexity
    from slim.export.formats import base_only, export
    from slim.format.checkpoint import dir_bytes, load_tokenizer, write_json

    torch.manual_seed(0)
    ck, work = Path(args.checkpoint), Path(args.work)
    ids, prov = wikitext2_ids(load_tokenizer(ck), args.data_dir)
    first = ids.reshape(1, -1)[:, : args.seqlen]

    def measure(model, label: str) -> dict:  # noqa: ANN001
        model.eval()
        with torch.no_grad():
            logits = model(first).logits.float()
        t0 = time.perf_counter()
        ppl = perplexity(model, ids, args.seqlen, args.limit, progress=False)
        print(f"  {label:34s} ppl {ppl['ppl']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return {"logits": logits, "ppl": ppl["ppl"], "windows": ppl["windows"]}

    print(f"slim {ck} (reference backend, fp32)", flush=True)
    slim_full = measure(slim.load(ck, backend="reference", dtype="fp32", cache=True), "slim, whole model")
    slim_base = measure(base_only(slim.load(ck, backend="reference", dtype="fp32")), "slim, base alone")
    decompress = CompressedTensorsConfig(run_compressed=False)
    loaders = {
        "compressed-tensors": (lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32), slim_base,
                               "AutoModelForCausalLM.from_pretrained(DIR)"),
        "peft": (lambda d: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
            d / "base", dtype=torch.float32, quantization_config=decompress), d / "adapter"), slim_full,
            "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR/base, quantization_config="
            "CompressedTensorsConfig(run_compressed=False)), DIR/adapter)"),
        "merged": (lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32), slim_full,
                   "AutoModelForCausalLM.from_pretrained(DIR)"),
    }
    rows = []
    for fmt, (load, ref, cmd) in loaders.items():
        d = work / fmt
        export(ck, d, fmt, dtype=args.dtype, overwrite=True)
        print(f"{fmt}: {dir_bytes(d) / 2**20:.1f} MiB", flush=True)
        m = measure(load(d), fmt)
        rows.append({"format": fmt, "load": cmd, "bytes": dir_bytes(d), "ppl": m["ppl"], "slim_ppl": ref["ppl"],
                     "ppl_rel_diff": m["ppl"] / ref["ppl"] - 1,
                     "max_abs_logit_diff": float((m["logits"] - ref["logits"]).abs().max()),
                     "compared_with": "slim base alone" if ref is slim_base else "slim whole model"})
        del m
    res = {"machine": machine(), "commit": source_commit(), "checkpoint": str(ck),
           "checkpoint_bytes": dir_bytes(ck), "dtype": args.dtype, "windows": args.limit, "seqlen": args.seqlen,
           "eval_data": prov, "slim_ppl": slim_full["ppl"], "slim_base_ppl": slim_base["ppl"], "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "export.json", res)
    mib = 2**20
    lines = [
        "# Export formats: loaded by third-party loaders, against slim\n",
        f"Machine: {describe_machine(res['machine'])}. Commit {res['commit']}. Checkpoint `{ck}` "
        f"({res['checkpoint_bytes'] / mib:.1f} MiB), exported in {args.dtype}, loaded in fp32. Logits: max absolute "
        f"difference on the first {args.seqlen}-token WikiText-2 window. Perplexity: {args.limit} windows of "
        f"{args.seqlen} tokens. slim (reference backend): whole model {slim_full['ppl']:.4f}, base alone "
        f"{slim_base['ppl']:.4f}.\n",
        "| format | size on disk MiB | loaded with | compared with | max abs logit diff | ppl | slim ppl "
        "| **ppl diff** |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['format']} | {r['bytes'] / mib:.1f} | `{r['load']}` | {r['compared_with']} | "
                     f"{r['max_abs_logit_diff']:.2e} | {r['ppl']:.4f} | {r['slim_ppl']:.4f} | "
                     f"**{100 * r['ppl_rel_diff']:+.3f} %** |")
    (out / "export.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'export.md'}")


if __name__ == "__main__":
    main()
