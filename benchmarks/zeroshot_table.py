"""Markdown table of `slim eval --tasks ... --out FILE.json` results, one column per model.

    python benchmarks/zeroshot_table.py --out docs/results/zeroshot/README.md \
        dense=docs/results/zeroshot/dense.json slim=docs/results/zeroshot/slim-default.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grid import describe_machine, machine  # benchmarks/ is on sys.path when run as a script


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="LABEL=FILE.json (from slim eval --out)")
    ap.add_argument("--out", required=True, help="markdown file to write")
    ap.add_argument("--title", default="Zero-shot accuracy (lm-evaluation-harness, 0-shot, full test sets)")
    ap.add_argument("--note", action="append", default=[], help="a line added under the table (repeatable)")
    args = ap.parse_args()
    runs = {}
    for item in args.results:
        label, _, path = item.partition("=")
        if not path:
            ap.error(f"{item!r}: expected LABEL=FILE.json")
        res = json.loads(Path(path).read_text())
        if "zeroshot" not in res:
            ap.error(f"{path}: no zero-shot results in it")
        runs[label] = res
    tasks = list(dict.fromkeys(t for r in runs.values() for t in r["zeroshot"]["tasks"]))
    lines = [f"# {args.title}\n", "| task | " + " | ".join(f"{k} acc | {k} acc_norm" for k in runs) + " |",
             "|---|" + "---|---|" * len(runs)]
    for t in tasks:
        cells = []
        for r in runs.values():
            v = r["zeroshot"]["tasks"].get(t, {})
            acc = f"{100 * v['acc']:.2f} ± {100 * v.get('acc_stderr', 0):.2f}" if "acc" in v else "—"
            norm = f"{100 * v['acc_norm']:.2f}" if "acc_norm" in v else "—"
            cells += [acc, norm]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    mean = [c for r in runs.values() for c in (f"**{100 * r['zeroshot']['mean_acc']:.2f}**", "")]
    lines.append("| **mean acc** | " + " | ".join(mean) + " |")
    lines += ["", "| model | evaluated | documents | time |", "|---|---|---|---|"]
    for k, r in runs.items():
        lim = r["zeroshot"].get("limit")
        docs = "all" if lim is None else f"first {lim} per task"
        minutes = r["zeroshot"].get("seconds", 0) / 60
        lines.append(f"| {k} | `{r['model']}` ({r['kind']}) | {docs} | {minutes:.1f} min |")
    lines += ["", f"Machine: {describe_machine(machine())}; lm-eval "
              f"{next(iter(runs.values()))['zeroshot'].get('lm_eval_version', '?')}.", *args.note]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
