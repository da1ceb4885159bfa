"""Block-tuning variants on the first K blocks of SmolLM2, compared by one number each: the relative error of block
K's output against the dense model's on held-out WikiText-2 text (8 x 512 tokens, never seen in calibration),
plus compression time. A cheap probe (minutes per variant instead of the ~30 of a perplexity row) to choose the
teacher, learning rate, steps and whether scales train, before the full rows in benchmarks/ablation.py.

    python benchmarks/archive/block_tune_probe.py --out docs/results/ablation/block-tune --blocks 4 \\
        --variants '{"closed form": {}, "32 steps": {"tune": {"steps": 32}}}'
    python benchmarks/archive/block_tune_probe.py --out DIR --blocks 6 --ppl-windows 16 --variants '{...}'
    python benchmarks/archive/block_tune_probe.py --out docs/results/ablation/block-tune --render A.json B.json

`--ppl-windows N` adds a perplexity proxy: WikiText-2 on its first N windows of 2048 tokens with the probed blocks
compressed and the others dense (the block error weighs the few massive-activation tokens most; perplexity does
not); ~1.5 min a variant for 16 windows on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]  # benchmarks/: the shared grid helpers


def probe(blocks: int, variants: dict[str, dict], data_dir: str | None, ppl_windows: int = 0) -> dict[str, dict]:
    import torch
    from torch import nn

    from slim.config import CompressConfig, merge
    from slim.data import calibration_ids, read_texts, wikitext2_ids
    from slim.eval.perplexity import perplexity
    from slim.models import load_model
    from slim.pipeline.capture import capture_block_inputs, run_block
    from slim.pipeline.loop import compress_model

    def truncated():
        m, tok, _ = load_model(None)
        rest = list(m.model.layers[blocks:])  # dense, put back for the perplexity proxy
        m.model.layers = m.model.layers[:blocks]
        m.config.num_hidden_layers = blocks
        return m, tok, rest

    def ppl(m, rest) -> float | None:
        """WikiText-2 perplexity on the first `ppl_windows` windows of 2048 tokens with the first `blocks` blocks
        as they are in `m` and the others dense: a proxy for the full row that weighs errors as perplexity does,
        not as the tuning loss does."""
        if not ppl_windows:
            return None
        m.model.layers = nn.ModuleList([*m.model.layers, *rest])
        m.config.num_hidden_layers = len(m.model.layers)
        return perplexity(m, ids, 2048, ppl_windows, progress=False)["ppl"]

    model, tok, rest = truncated()
    base = CompressConfig()
    texts, _ = read_texts(base.calib.data, data_dir)
    calib = calibration_ids(tok, texts, base.calib.n_samples, base.calib.seqlen, base.calib.seed)
    ids, _ = wikitext2_ids(tok, data_dir)
    held = ids.reshape(-1)[: 8 * 512].view(8, 512)

    def last_hidden(m) -> torch.Tensor:
        h, kw = capture_block_inputs(m, held, 4)
        for blk in m.model.layers:
            h = run_block(blk, h, kw, "cpu")
        return torch.cat(list(h))

    def token_err(h: torch.Tensor) -> float:
        return float(((h - dense).pow(2).sum(-1) / dense.pow(2).sum(-1)).mean())

    dense = last_hidden(model)
    dense_ppl = ppl(model, rest)
    res = {}
    for name, over in variants.items():
        m, _, rest = truncated()
        cfg = CompressConfig.from_dict(merge(base.to_dict(), over))
        t0 = time.perf_counter()
        rep = compress_model(m, calib, cfg, progress=False)
        sec = time.perf_counter() - t0
        h = last_hidden(m)
        err = float((h - dense).pow(2).sum() / dense.pow(2).sum())
        tune = {k.rsplit(".", 2)[0]: v.get("block_tune") for k, v in rep["layers"].items()}
        res[name] = {"overrides": over, "err": err, "err_token": token_err(h), "seconds": sec, "tune": tune}
        if ppl_windows:
            res[name].update({"ppl": ppl(m, rest), "ppl_windows": ppl_windows, "dense_ppl": dense_ppl})
        print(f"{name}: block-{blocks} output error {err:.5f} (per token {res[name]['err_token']:.5f}), {sec:.0f} s"
              + (f", ppl {res[name]['ppl']:.3f} on {ppl_windows} windows (dense {dense_ppl:.3f})" if ppl_windows
                 else ""), flush=True)
    return res


def render(res: dict[str, dict], blocks: int) -> str:
    base = next((r["err"] for r in res.values() if not r["overrides"]), None)
    lines = [f"# Block tuning probe: SmolLM2, first {blocks} blocks\n",
             f"Relative squared error of block {blocks}'s output against the dense model's on 8 x 512 held-out "
             "WikiText-2 tokens; the default recipe, 128 x 512 C4 calibration; time = compressing the "
             f"{blocks} blocks.\n",
             "Rows with a per-token error also give the mean over tokens of each token's relative error (a window's "
             "first token, with massive activations, weighs as any other); rows with a perplexity give WikiText-2 "
             "perplexity on its first N windows of 2048 tokens with these blocks compressed and the rest dense.\n",
             "| variant | overrides | output error | vs closed form | per-token error | ppl (N windows; dense) "
             "| seconds | s per block tuning | best step / steps per block | code |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        tunes = [t for t in r["tune"].values() if t]
        per = sum(t["seconds"] for t in tunes) / len(tunes) if tunes else 0
        steps = ", ".join(f"{t['best_step']}/{t['steps']}" for t in tunes)
        vs = f"{r['err'] / base - 1:+.1%}" if base else ""
        tok = f"{r['err_token']:.5f}" if "err_token" in r else ""
        ppl = f"{r['ppl']:.3f} ({r['ppl_windows']}; {r['dense_ppl']:.3f})" if r.get("ppl") else ""
        lines.append(f"| {name} | `{json.dumps(r['overrides'])}` | {r['err']:.5f} | {vs} | {tok} | {ppl} | "
                     f"{r['seconds']:.0f} | {per:.1f} | {steps} | {(r.get('commit') or '')[:7]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (probe.json + probe.md)")
    ap.add_argument("--blocks", type=int, default=4, help="how many of the first blocks (4)")
    ap.add_argument("--variants", default='{"closed form": {}, "32 steps": {"tune": {"steps": 32}}}',
                    help="JSON: name -> recipe overrides on the default recipe")
    ap.add_argument("--render", nargs="*", metavar="JSON", help="only merge these probe JSON files and render")
    ap.add_argument("--ppl-windows", type=int, default=0,
                    help="also WikiText-2 perplexity on the first N windows of 2048 tokens, later blocks dense "
                         "(0: off)")
    ap.add_argument("--data-dir")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from grid import machine, source_commit

    from slim.format.checkpoint import write_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render is not None:
        res: dict[str, dict] = {}
        for f in args.render:  # each variant keeps the commit that measured it
            saved = json.loads(Path(f).read_text())
            res.update({k: {"commit": saved.get("commit"), **v} for k, v in saved["variants"].items()})
    else:
        res = {k: {"commit": source_commit(), **v}
               for k, v in probe(args.blocks, json.loads(args.variants), args.data_dir, args.ppl_windows).items()}
    write_json(out / "probe.json", {"machine": machine(), "commit": source_commit(), "blocks": args.blocks,
                                    "variants": res})
    (out / "probe.md").write_text(render(res, args.blocks))
    print(render(res, args.blocks))


if __name__ == "__main__":
    main()
