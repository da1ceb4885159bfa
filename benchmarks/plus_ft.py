"""The +FT table: WikiText-2 perplexity before and after `slim finetune`, with each run's budget and time.

Each RUN is LABEL=DIR, a checkpoint written by `slim finetune`; its slim_config.json names the checkpoint it started
from and records the training (options, tokens, epochs, every step's loss and time, also over resumed pieces).
Both checkpoints are scored on the full WikiText-2 test set with `slim eval`; the scores are kept in
OUT/evals/ by content hash, so a source shared by several runs (and any run already scored) is evaluated once.
Writes OUT/results.json and OUT/README.md. `--keep` keeps the rows of an existing OUT/results.json that this call
does not score again (a bounded GPU call can then add rows to an earlier call's table); each row records the
command that scored it.

    python benchmarks/plus_ft.py --out docs/results/finetune/plus-ft default+KD=/work/runs/ck/default-ft-kd
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grid import describe_machine, machine, source_commit, write_result

from slim.cli.commands import main as slim_main
from slim.format.checkpoint import read_slim_config

DENSE_PPL = 21.61  # SmolLM2-135M-Instruct (fp32), full WikiText-2, docs/results/ablation


def scored(ckpt: Path, evals: Path, limit: int | None, data_dir: str | None, device: str = "cpu",
           backend: str = "auto", dtype: str | None = None) -> dict[str, Any]:
    """`slim eval` of a checkpoint, cached in `evals` under its content hash and the evaluation's settings."""
    sha = read_slim_config(ckpt).get("content_sha256") or ckpt.name
    how = "".join(f"-{v}" for v in (backend, dtype) if v and v != "auto")
    f = evals / f"{sha[:16]}{how}{'' if limit is None else f'-limit{limit}'}.json"
    if not f.is_file():
        evals.mkdir(parents=True, exist_ok=True)
        cmd = ["eval", str(ckpt), "--out", str(f), "-q", *(["--limit", str(limit)] if limit else []),
               *(["--data-dir", data_dir] if data_dir else []), "--device", device,
               "--backend", backend, *(["--dtype", dtype] if dtype else []),
               *(["--dense-cache"] if backend == "reference" else [])]
        if slim_main(cmd) != 0:
            raise SystemExit(f"slim {' '.join(cmd)} failed")
    w = json.loads(f.read_text())["wikitext2"]
    return {"ppl": w["ppl"], "windows": w["windows"], "file": str(f), "checkpoint": str(ckpt)}


def duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 120 else \
        f"{seconds:.0f} s"


def table(res: dict[str, Any]) -> str:
    lines = ["# `slim finetune` (+FT) on SmolLM2-135M: WikiText-2 before and after\n",
             f"Machine: {describe_machine(res['machine'])}. WikiText-2: full test set, 2048-token windows (dense "
             f"{DENSE_PPL}). Training: C4 (the shipped sample, repeated in epochs), 1024-token blocks, global batch "
             "64, Adafactor, linear decay to 0; time is the sum of the training steps' wall "
             "clock, over every resumed piece.",
             *commands(res),
             "| run | from | distill | lr | autocast | tokens | epochs | training time | tokens/s | ppl before | "
             "ppl after | gap to dense after / before | LM loss first → last |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in res["runs"].items():
        c, b, a = r["config"], r["before"]["ppl"], r["after"]["ppl"]
        lines.append(f"| {label} | {r['source']} | {c['distill'] or 'no'} | {c['lr']:g} | {c['autocast']} | "
                     f"{r['tokens']:,} | "
                     f"{r['epochs']:.2f} | {duration(r['train_seconds'])} | {r['tokens_per_second']:.0f} | "
                     f"{b:.2f} | **{a:.2f}** | {(a - DENSE_PPL) / (b - DENSE_PPL):.2f}x | "
                     f"{r['lm_loss'][0]:.3f} → {r['lm_loss'][1]:.3f} |")
    return "\n".join(lines) + "\n"


def commands(res: dict[str, Any]) -> list[str]:
    """The scoring command(s) under the table's title: one line, or one per call when --keep merged calls."""
    by: dict[tuple[str, str], list[str]] = {}
    for label, r in res["runs"].items():
        s = r["scored_by"]  # main() sets it on every row, kept or new
        by.setdefault((s["command"], (s["commit"] or "?")[:7]), []).append(label)
    if len(by) == 1:
        (cmd, commit), = by
        return [f"Command: `{cmd}` (code {commit})\n"]
    return ["Commands:", *(f"- {', '.join(labels)}: `{cmd}` (code {commit})" for (cmd, commit), labels in by.items()),
            ""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=DIR, a checkpoint written by slim finetune")
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, help="WikiText-2 windows (quick checks only; default: all)")
    ap.add_argument("--data-dir")
    ap.add_argument("--device", default="cpu", help="where the checkpoints are scored: cpu (default) or cuda")
    ap.add_argument("--backend", default="auto", help="slim eval's --backend (reference: the plain formula)")
    ap.add_argument("--dtype", default=None, help="slim eval's --dtype (fp32: as the ablation and baselines grids)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the rows of OUT/results.json that this call does not score again")
    args = ap.parse_args()
    out = Path(args.out)
    runs: dict[str, tuple[Path, Path, dict[str, Any]]] = {}
    for item in args.runs:  # every path is checked before the first (long) evaluation
        label, _, d = item.partition("=")
        if not d:
            ap.error(f"{item!r}: expected LABEL=DIR")
        meta = read_slim_config(Path(d))
        if "finetune" not in meta or not meta.get("finetuned_from"):
            ap.error(f"{d}: not a checkpoint written by slim finetune (no finetune record)")
        runs[label] = (Path(d), Path(meta["finetuned_from"]), meta)
    res: dict[str, Any] = {"machine": machine(), "commit": source_commit(),
                           "command": "python " + " ".join(sys.argv), "runs": {}}
    if args.keep and (out / "results.json").is_file():
        old = json.loads((out / "results.json").read_text())
        for label, r in old["runs"].items():  # in their order; a label scored again is replaced in place
            r.setdefault("scored_by", {"command": old["command"], "commit": old["commit"]})
            res["runs"][label] = r
    scored_by = {"command": res["command"], "commit": res["commit"]}
    for label, (d, src, meta) in runs.items():
        ft = meta["finetune"]
        hist = ft["history"]
        train = ft.get("train_seconds", ft["seconds"])  # runs from before per-step times: one piece's wall time
        res["runs"][label] = {
            "source": src.name, "config": ft["config"], "tokens": ft["tokens"], "epochs": ft["epochs"],
            "train_seconds": train, "tokens_per_second": ft["tokens"] / max(train, 1e-9),
            "lm_loss": [hist[0]["lm_loss"], hist[-1]["lm_loss"]], "kl": [hist[0]["kl"], hist[-1]["kl"]],
            "command": meta.get("command"), "scored_by": scored_by,
            "before": scored(src, out / "evals", args.limit, args.data_dir, args.device, args.backend, args.dtype),
            "after": scored(d, out / "evals", args.limit, args.data_dir, args.device, args.backend, args.dtype)}
        text = write_result(out, res, table)  # after each run: an interrupted table keeps the runs scored so far
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
