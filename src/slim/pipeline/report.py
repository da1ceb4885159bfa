"""Turn result JSON files into a markdown report with plots (matplotlib, an optional extra).

Inputs, any mix:
  * a grid's results.json (benchmarks/ablation.py): {"rows": {name: {ppl, bits_per_weight, ...}}}
  * a checkpoint directory: its slim_config.json (recipe, per-layer errors) and results.json
    (`slim compress --eval[-dense]`)
  * a `slim eval --out` JSON: {"model", "wikitext2", "zeroshot"}
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _load(p: Path) -> dict[str, Any]:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read result file {p}: {e}") from None


def collect(paths: list[str | Path]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(methods, per-layer errors): methods[name] = {ppl, bits_per_weight, compress_seconds, tasks, ...}."""
    methods: dict[str, dict[str, Any]] = {}
    layers: dict[str, dict[str, Any]] = {}
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            cfg_file, res_file = p / "slim_config.json", p / "results.json"
            if not cfg_file.exists() and not res_file.exists():
                raise ValueError(f"{p} holds neither slim_config.json nor results.json")
            name = p.name
            m = methods.setdefault(name, {})
            if cfg_file.exists():
                cfg = _load(cfg_file)
                rep = cfg.get("report", {})
                m.update({k: rep.get(k) for k in ("bits_per_weight", "compress_seconds", "linear_bytes")})
                if rep.get("layers"):
                    layers[name] = rep["layers"]
            if res_file.exists():
                res = _load(res_file)
                if "rows" in res:
                    _add_rows(methods, layers, res)
                    continue
                if "compressed" in res:
                    m["ppl"] = res["compressed"]["ppl"]
                if "dense" in res:
                    methods.setdefault("dense", {"bits_per_weight": 16.0})["ppl"] = res["dense"]["ppl"]
            continue
        res = _load(p)
        if "rows" in res:
            _add_rows(methods, layers, res)
        elif "wikitext2" in res or "zeroshot" in res:
            name = "dense" if res.get("kind") == "dense model" else Path(str(res.get("model"))).name
            m = methods.setdefault(name, {"bits_per_weight": 16.0} if name == "dense" else {})
            if res.get("bits_per_weight"):
                m["bits_per_weight"] = res["bits_per_weight"]
            if "wikitext2" in res:
                m["ppl"] = res["wikitext2"]["ppl"]
            if "zeroshot" in res:
                m["tasks"] = {t: v["acc"] for t, v in res["zeroshot"]["tasks"].items()}
                m["mean_acc"] = res["zeroshot"]["mean_acc"]
        else:
            raise ValueError(f"{p}: not a slim result file (no rows, wikitext2 or zeroshot)")
    return methods, layers


def _add_rows(methods: dict, layers: dict, res: dict) -> None:
    for name, r in res["rows"].items():
        m = methods.setdefault(name, {})
        m.update({k: r.get(k) for k in ("ppl", "compress_seconds", "description") if r.get(k) is not None})
        m["bits_per_weight"] = r.get("bits_per_weight") or 16.0
        if r.get("layers"):
            layers[name] = r["layers"]


def layer_error(info: dict[str, Any], metric: str) -> float | None:
    """A layer's final relative error in one metric: 'diag' (every method reports it) or 'gram'."""
    if f"rel_err_final_{metric}" in info:
        return info[f"rel_err_final_{metric}"]
    return info.get("rel_err_final") if info.get("err_metric", "diag") == metric else None


def errors_by_kind(layers: dict[str, dict[str, Any]], metric: str = "diag") -> dict[str, dict[str, float]]:
    """method -> layer kind (q_proj, down_proj, ...) -> mean final relative error in `metric`."""
    out: dict[str, dict[str, float]] = {}
    for method, lay in layers.items():
        sums: dict[str, list[float]] = {}
        for name, info in lay.items():
            e = layer_error(info, metric)
            if e is not None:
                sums.setdefault(name.rsplit(".", 1)[-1], []).append(e)
        if sums:
            out[method] = {k: sum(v) / len(v) for k, v in sums.items()}
    return out


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "" if v is None else format(v, spec)


def write_report(paths: list[str | Path], out: str | Path, title: str = "slim report") -> Path:
    """Write OUT/report.md and its PNG plots; returns the report path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'slim-compress[eval]'") from None
    methods, layers = collect(paths)
    if not methods:
        raise ValueError("no results found in the given files")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task_names = sorted({t for m in methods.values() for t in m.get("tasks", {})})
    head = ["method", "WikiText-2 ppl", "bits/weight", "compress s", *task_names, "mean acc"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in sorted(methods.items(), key=lambda kv: (kv[0] != "dense", kv[1].get("ppl") or 1e9)):
        cells = [name, _fmt(m.get("ppl")), _fmt(m.get("bits_per_weight"), ".3f"),
                 _fmt(m.get("compress_seconds"), ".0f"),
                 *[_fmt(m.get("tasks", {}).get(t), ".4f") for t in task_names], _fmt(m.get("mean_acc"), ".4f")]
        lines.append("| " + " | ".join(cells) + " |")

    metrics = {"diag": "||E diag(rms x)||^2 / ||W diag(rms x)||^2, the diagonal metric every method reports",
               "gram": "tr(E H E^T) / tr(W H W^T) with the full input Gram matrix H, for methods that collect it "
                       "(or ran with calib.gram_errors)"}
    for metric, formula in metrics.items():
        by_kind = errors_by_kind(layers, metric)
        if not by_kind or (metric == "gram" and len(by_kind) < 2):
            continue
        kinds = list(dict.fromkeys(k for v in by_kind.values() for k in v))
        lines += ["", f"Mean final relative output error per layer kind on the calibration data, {formula} "
                  "(why one method beats another is usually visible here):", "",
                  "| method | " + " | ".join(kinds) + " | mean | ppl |", "|" + "---|" * (len(kinds) + 3)]
        for name, v in sorted(by_kind.items(), key=lambda kv: methods.get(kv[0], {}).get("ppl") or 1e9):
            mean = sum(v.values()) / len(v)
            lines.append(f"| {name} | " + " | ".join(_fmt(v.get(k), ".4f") for k in kinds)
                         + f" | {mean:.4f} | {_fmt(methods.get(name, {}).get('ppl'))} |")

    pts = [(n, m["bits_per_weight"], m["ppl"]) for n, m in methods.items() if m.get("ppl") and m.get("bits_per_weight")]
    if pts:
        _scatter(plt, pts, "WikiText-2 perplexity (lower is better)", "Perplexity against storage",
                 out / "pareto_ppl.png", log_y=True)
        lines += ["", "![perplexity vs bits per weight](pareto_ppl.png)"]
    acc_pts = [(n, m["bits_per_weight"], 100 * m["mean_acc"]) for n, m in methods.items()
               if m.get("mean_acc") is not None]
    if acc_pts:
        _scatter(plt, acc_pts, "mean 0-shot accuracy (%)", "Accuracy against storage", out / "pareto_acc.png")
        lines += ["", "![accuracy vs bits per weight](pareto_acc.png)"]
    for name, lay in layers.items():
        names = list(lay)
        before = [lay[k].get("rel_err_compressed") for k in names]
        after = [lay[k].get("rel_err_final") for k in names]
        if None in before or None in after:
            continue
        fig, ax = plt.subplots(figsize=(10, 4))
        x = range(len(names))
        ax.plot(x, before, ".-", lw=0.8, label="sparse + quantized, before adapters")
        ax.plot(x, after, ".-", lw=0.8, label="with adapters (final)")
        ax.set_yscale("log")
        ax.set_xlabel("linear layer, in model order (7 per block for Llama)")
        metric = next(iter(lay.values())).get("err_metric", "diag")
        ax.set_ylabel("relative output error on calibration data")
        formula = "tr(E H E^T) / tr(W H W^T)" if metric == "gram" else "||E diag(rms x)||^2 / ||W diag(rms x)||^2"
        ax.set_title(f"{name}: per-layer relative output error, {formula}")
        ax.legend()
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fname = f"layer_error_{''.join(c if c.isalnum() or c in '-_' else '_' for c in name)}.png"
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        mean_b, mean_a = sum(before) / len(before), sum(after) / len(after)
        lines += ["", f"**{name}**: mean relative layer error {mean_b:.4f} before adapters, {mean_a:.4f} after.",
                  "", f"![{name} per-layer error]({fname})"]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _scatter(
    plt, pts: list[tuple[str, float, float]], ylabel: str, title: str, path: Path, log_y: bool = False
) -> None:
    """One labelled point per method against bits per weight."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, x, y in pts:
        ax.scatter(x, y, s=40)
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(5, 3), fontsize=8)
    ax.set_xlabel("bits per weight of the linear layers (as stored)")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
