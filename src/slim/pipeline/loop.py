"""The driver: a HF model plus a CompressConfig in, a model whose block linears are SlimLinear out."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..algorithms.affine import let_map
from ..algorithms.methods import ADAPTERS
from ..algorithms.stats import InputStats
from ..config import CompressConfig, check_device
from ..format.packed import SlimLinear, set_dense_cache
from ..models import check_compressible, find_linears, get_layers, layers_prefix, set_submodule
from ..phases import phase
from ..phases import reset as reset_phases
from ..phases import seconds as phase_seconds
from ..testing.faults import fault
from .capture import Activations, capture_block_inputs, run_block
from .dist import Ranks
from .solver import allocate_ranks, closed_form_adapters, compress_weight, error_spectrum
from .stream import BlockRun
from .tune import UpTo, halves, tune_block

log = logging.getLogger(__name__)


@torch.no_grad()
def compress_model(
    model: nn.Module, calib_ids: torch.Tensor, cfg: CompressConfig, progress: bool = True,
    masks: dict[str, torch.Tensor] | None = None, run: BlockRun | None = None, max_memory: int | None = None,
    ranks: Ranks | None = None, checked: bool = False,
) -> dict[str, Any]:
    """Compress every linear inside the decoder blocks, block by block, in place.

    Block i+1 is calibrated on the outputs of the already compressed block i. Only one block is on
    the compute device at a time. With a `run` (`slim.pipeline.stream.BlockRun`), blocks are read from disk when it
    streams, each compressed block is committed to disk and dropped, and an interrupted run resumes after its
    last committed block. When the calibration activations (two copies: a block's inputs and outputs; four with
    block tuning) would take more than a quarter of `max_memory` bytes, they live in files on disk instead, read
    one batch at a time. With block tuning on (`cfg.tune`), each block's adapters are then tuned against the dense
    block's outputs (`slim.pipeline.tune`).
    With `ranks` (`slim.pipeline.dist`, several processes under torchrun), each rank runs its share of the calibration
    batches, statistics are summed across ranks and each block's linears are solved on different ranks.
    `checked`: the caller already ran `check_compressible` (a scan of every weight) on this model and config.
    Returns a report with per-layer errors and timings.
    """
    if not checked:
        check_compressible(model, cfg)
    device = check_device(cfg.device)
    ranks = ranks or Ranks()
    if ranks.active:
        calib_ids = _share(calib_ids, cfg.calib.batch_size, ranks)
    t0 = time.perf_counter()
    log.info(
        "calibrating on %d x %d tokens (seed %d)%s", calib_ids.shape[0], calib_ids.shape[1], cfg.calib.seed,
        "; CPU default seqlen is 512 (the paper uses 2048)" if device == "cpu" else "",
    )
    act_bytes = calib_ids.numel() * model.config.hidden_size * model.get_input_embeddings().weight.element_size()
    copies = 2  # a block's inputs and outputs (+ the teacher's inputs and targets, + the states after attention)
    if cfg.tune.enabled:
        copies += 3 if cfg.tune.units == "attn-mlp" else 2
    spill = None
    if max_memory is not None and copies * act_bytes > max_memory / 4:
        spill = Path(tempfile.mkdtemp(prefix="slim-act-")) if run is None else run.dir / "activations"
        spill.mkdir(exist_ok=True)
        log.info("calibration activations (%d x %.0f MiB) exceed a quarter of the memory budget (%.0f MiB): kept in "
                 "files under %s", copies, act_bytes / 2**20, max_memory / 2**20, spill)
    try:
        return _compress_blocks(model, calib_ids, cfg, progress, masks, run, spill, device, t0, ranks)
    finally:
        if spill is not None and run is None:
            shutil.rmtree(spill, ignore_errors=True)


def _compress_blocks(model: nn.Module, calib_ids: torch.Tensor, cfg: CompressConfig, progress: bool,
                     masks: dict[str, torch.Tensor] | None, run: BlockRun | None, spill: Path | None, device: str,
                     t0: float, ranks: Ranks) -> dict[str, Any]:
    layers = get_layers(model)
    prefix = layers_prefix(model)
    jsq_clip = cfg.sparsity.jsq_clip if cfg.needs_jsq and masks is None else None
    reset_phases()
    with phase("calibrate"):
        hidden, kwargs = capture_block_inputs(model, calib_ids, cfg.calib.batch_size, device, spill)
    per_layer: dict[str, dict[str, Any]] = {}
    start = 0
    # block tuning with the dense teacher: the dense model's own stream, run beside the compressed one (None while
    # the two are the same, before block 0)
    teacher: Activations | None = None
    if run is not None:
        start, hidden, teacher = run.resume(model, hidden, spill)
        per_layer.update(run.per_layer)
    tuning = cfg.tune.enabled
    with_gram = cfg.needs_gram or cfg.calib.gram_errors
    fast = torch.bfloat16 if cfg.calib.autocast == "bf16" else None  # the calibration forwards' autocast dtype
    bar = tqdm(range(start, len(layers)), desc="compressing blocks", unit="block", disable=not progress,
               initial=start, total=len(layers))
    for i in bar:
        with phase("io"):
            block = (layers[i] if run is None else run.load(model, i)).to(device)
        linears = find_linears(block)
        # block tuning's targets: the dense block's outputs, before its linears are replaced; on the compressed
        # stream (block 0, or tune.teacher compressed) they are the statistics pass's own outputs
        own_stream = teacher is None or cfg.tune.teacher == "compressed"
        targets = mids = None
        with phase("calibrate"):
            if tuning:
                targets = (Activations(spill, f"t{i:05d}") if own_stream
                           else run_block(block, teacher, kwargs, device, spill=spill, tag=f"t{i:05d}",
                                          autocast=fast))
            if tuning and cfg.tune.units == "attn-mlp":  # the dense block's states after attention
                mids = run_block(UpTo(block, halves(block)[0]), hidden if own_stream else teacher, kwargs, device,
                                 spill=spill, tag=f"m{i:05d}", autocast=fast)
            stats, groups = _collect_stats(block, linears, hidden, kwargs, device, with_gram, jsq_clip=jsq_clip,
                                           with_abs=cfg.needs_abs, outputs=targets if own_stream else None,
                                           autocast=fast)
            _reduce(stats, ranks)
        stats, measure = _split_gram(stats, cfg)
        adapter_ranks: dict[str, int] = {}
        if cfg.adapter.allocation == "greedy" and cfg.adapter.method != "none":
            spectra = {k: error_spectrum(lin.weight.data, stats[k], cfg, _mask(masks, f"{prefix}.{i}.{k}"), k)
                       for k, lin in linears.items()}
            adapter_ranks = allocate_ranks(spectra, {k: tuple(lin.weight.shape) for k, lin in linears.items()},
                                      cfg.adapter)
        # true-sequential: group by group, each measured behind the compressed ones; else the block at once
        units = groups if cfg.true_sequential else [[k for g in groups for k in g]]
        for gi, unit in enumerate(units):
            if gi > 0:  # re-measure this group's inputs behind compressed groups
                again = _collect_stats(block, linears, hidden, kwargs, device, with_gram, only=unit,
                                       jsq_clip=jsq_clip, with_abs=cfg.needs_abs, autocast=fast)[0]
                _reduce(again, ranks)
                again, again_measure = _split_gram(again, cfg)
                stats.update(again)
                measure.update(again_measure)
            owner = ranks.owners([linears[k].weight.numel() for k in unit])
            solved = {}
            for k, o in zip(unit, owner, strict=True):
                if o != ranks.rank:
                    continue
                with phase("solve"):
                    cw = compress_weight(linears[k].weight.data, stats[k], cfg,
                                         mask=_mask(masks, f"{prefix}.{i}.{k}"), name=k, rank=adapter_ranks.get(k),
                                         measure_gram=measure.get(k))
                if ranks.active:  # installed below, once every rank has solved its share
                    solved[k] = cw
                else:
                    with phase("install"):
                        per_layer[f"{prefix}.{i}.{k}"] = _install(block, linears[k], k, cw, cfg, device)
                fault("block")
            for k, o in zip(unit, owner, strict=True):
                if ranks.active:
                    cw = ranks.broadcast(solved.pop(k, None), o)
                    per_layer[f"{prefix}.{i}.{k}"] = _install(block, linears[k], k, cw, cfg, device)
        refit = _adapter_refit(linears, stats, cfg) if tuning and cfg.tune.weights and cfg.tune.adapter_refit else None
        del stats
        if targets is not None:
            with phase("tune"):
                tuned = tune_block(block, hidden, targets, kwargs, device, cfg.tune, seed=cfg.calib.seed + i,
                                   ranks=ranks, lwc_init=cfg.quant.lwc_init, config=model.config,
                                   clip_sources={k: lin.weight.data for k, lin in linears.items()},
                                   on_step=_tune_progress(bar), refit=refit, mid_targets=mids)
            del refit
            if mids is not None:
                mids.drop()
            for k in linears:
                per_layer[f"{prefix}.{i}.{k}"]["block_tune"] = tuned
            if teacher is not None:
                teacher.drop()
            if cfg.tune.teacher == "dense":
                teacher = targets
            else:
                targets.drop()
        with phase("calibrate"):
            out = run_block(block, hidden, kwargs, device, spill=spill, tag=f"b{i:05d}", autocast=fast)
        hidden.drop()
        hidden = out
        set_dense_cache(block, False)
        layers[i] = block.to("cpu")
        names = [f"{prefix}.{i}.{k}" for k in linears]
        errs = [per_layer[k]["rel_err_final"] for k in names]
        bar.set_postfix(rel_err=f"{sum(errs) / len(errs):.4f}")
        if run is not None:
            with phase("io"):
                run.commit(model, i, hidden, {k: per_layer[k] for k in names}, teacher)
    elapsed = time.perf_counter() - t0
    log.info("compressed %d blocks in %.1f s%s", len(layers) - start, elapsed,
             f" (resumed after block {start - 1})" if start else "")
    # a resumed run: also the wall time of every piece (what the compression cost in all)
    resumed = {"resumed_at_block": start, "compress_seconds_all_pieces": run.seconds()} if start else {}
    return {"compress_seconds": elapsed, "phase_seconds": phase_seconds(), "layers": per_layer,
            **size_report(model), **resumed}


def _adapter_refit(linears: dict[str, nn.Module], stats: dict[str, InputStats], cfg: CompressConfig,
                   ) -> Callable[[str, SlimLinear], tuple[torch.Tensor, torch.Tensor] | None] | None:
    """Block tuning's closed-form candidate for each layer's adapters after weight tuning: fitted to the dense
    weight minus the tuned, re-quantized one, on the layer's calibration statistics (kept for this)."""
    if ADAPTERS[cfg.adapter.method].fit is None:
        return None

    def refit(name: str, layer: SlimLinear) -> tuple[torch.Tensor, torch.Tensor] | None:
        if name not in linears or name not in stats or not layer.layout.rank:
            return None
        with torch.no_grad():
            scale = layer.input_scale.float() if layer.layout.input_scale else None
            return closed_form_adapters(linears[name].weight.data, layer.dequantized_weight(), stats[name], cfg,
                                        layer.layout.rank, scale)
    return refit


def _tune_progress(bar: Any) -> Callable[[int, int, float], None]:
    """Block tuning's step and loss in the block bar's postfix, about a hundred refreshes a block."""
    def show(step: int, steps: int, loss: float) -> None:
        if step % max(1, steps // 100) == 0 or step == steps:
            bar.set_postfix_str(f"tune {step}/{steps} loss={loss:.4f}")
    return show


def _install(block: nn.Module, lin: nn.Linear, name: str, cw: Any, cfg: CompressConfig,
             device: str) -> dict[str, Any]:
    """Put the compressed linear in place of `lin` inside the block; returns its per-layer record."""
    kind = cfg.sparsity.kind
    n, m = cfg.sparsity.nm  # (0, 0) unless N:M
    bias = None if lin.bias is None else lin.bias.data.detach().cpu()
    if bias is None and cfg.tune.let and name in let_map(block).biased:  # AffineQuant's shifts end up in biases
        bias = torch.zeros(lin.out_features, dtype=lin.weight.dtype)
    new = SlimLinear.from_compressed(cw, bias, kind, n, m, fp8_inputs=cfg.fp8_inputs)
    new.cache = True  # the block runs on every calibration batch next; dropped after that
    set_submodule(block, name, new.to(device))
    return {"shape": list(lin.weight.shape), **cw.info}


def _share(ids: torch.Tensor, batch_size: int, ranks: Ranks) -> torch.Tensor:
    """This rank's calibration windows: whole batches, every world-th one (the last, possibly short, batch stays
    last), so each batch is computed exactly as one process computes it."""
    n = -(-ids.shape[0] // batch_size)
    return torch.cat([ids[b * batch_size : (b + 1) * batch_size] for b in ranks.batches(n)])


def _reduce(stats: dict[str, InputStats], ranks: Ranks) -> None:
    """Sum every rank's statistics (linears sharing one InputStats are reduced once)."""
    if not ranks.active:
        return
    for st in {id(s): s for s in stats.values()}.values():
        jsq = st.jsq
        counts = torch.tensor([st.n_tokens, jsq.n_seqs if jsq else 0], dtype=torch.float64, device=st.sum_sq.device)
        parts = (st.sum_sq, st.gram, st.sum_abs, counts, *((jsq.sum_sq, jsq.pos_sum) if jsq else ()))
        ranks.all_reduce([t for t in parts if t is not None])
        st.n_tokens = int(counts[0])
        if jsq:
            jsq.n_seqs = int(counts[1])
        st.cache.clear()


def _split_gram(
    stats: dict[str, InputStats], cfg: CompressConfig,
) -> tuple[dict[str, InputStats], dict[str, torch.Tensor]]:
    """Take out Gram matrices collected only for reporting (calib.gram_errors), so no algorithm sees them.

    Returns the statistics the algorithms get and the Gram matrices to measure errors with; linears that
    share one InputStats keep sharing it.
    """
    if not cfg.calib.gram_errors or cfg.needs_gram:
        return stats, {}
    measure = {k: st.mean_gram for k, st in stats.items() if st.gram is not None}
    stripped: dict[int, InputStats] = {}
    out = {k: stripped.setdefault(id(st), dataclasses.replace(st, gram=None)) for k, st in stats.items()}
    return out, measure


def _mask(masks: dict[str, torch.Tensor] | None, name: str) -> torch.Tensor | None:
    return None if masks is None else masks.get(name)


class _GroupInputsSeen(Exception):
    """Stops a block's forward once the inputs of the linears being measured have been seen."""


def _collect_stats(
    block: nn.Module, linears: dict[str, nn.Linear], hidden: list[torch.Tensor], kwargs: list[dict[str, Any]],
    device: str, with_gram: bool, only: list[str] | None = None, jsq_clip: float | None = None,
    with_abs: bool = True, outputs: Activations | None = None, autocast: torch.dtype | None = None,
) -> tuple[dict[str, InputStats], list[list[str]]]:
    """Input statistics of the block's linears (or of `only`, one group, stopping the forward there).

    Linears fed the same tensor (q/k/v, gate/up) form a group and share one InputStats. Returns the
    statistics and the groups in execution order; the block's outputs go to `outputs` when given (whole blocks
    only).
    """
    if outputs is not None and only is not None:
        raise ValueError("_collect_stats: outputs are only kept when the whole block runs")
    names = list(linears) if only is None else list(only)
    # `only` is one group fed one tensor: its first linear measures it for all, and the forward stops there
    # (before the group's other linears run, so they must not wait for their own hooks)
    measured = names if only is None else names[:1]
    stats = {k: InputStats.empty(linears[k].in_features, with_gram, device, jsq_clip, with_abs) for k in measured}
    owner: dict[str, str] = {} if only is None else dict.fromkeys(names, names[0])
    order: list[str] = []
    last: dict[str, Any] = {"x": None, "name": None}

    def make_hook(k: str):
        def hook(_m: nn.Module, inp: tuple, _o: torch.Tensor) -> None:
            x = inp[0]
            if k not in order:
                owner.setdefault(k, owner[last["name"]] if last["x"] is x else k)
                order.append(k)
            if owner[k] == k and k in stats:
                stats[k].add(x)
                if only is not None:
                    raise _GroupInputsSeen
            last["x"], last["name"] = x, k

        return hook

    hooks = [lin.register_forward_hook(make_hook(k)) for k, lin in linears.items()]
    try:
        if only is None:
            run_block(block, hidden, kwargs, device, keep=outputs is not None, into=outputs, autocast=autocast)
        else:
            for h, kw in zip(hidden, kwargs, strict=True):
                try:
                    run_block(block, [h], [kw], device, keep=False, autocast=autocast)
                except _GroupInputsSeen:
                    pass
                last["x"] = None
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    for k in order:
        if owner[k] == k:
            groups.append([k])
        else:
            next(g for g in groups if g[0] == owner[k]).append(k)
    return {k: stats[owner[k]] for k in names}, groups


def size_report(model: nn.Module) -> dict[str, Any]:
    """Stored bytes of the compressed linears vs the same linears in fp16."""
    stored = dense = 0
    n_weights = 0
    for mod in model.modules():
        if isinstance(mod, SlimLinear):
            L = mod.layout
            stored += mod.stored_bytes()
            dense += 2 * L.d_in * L.d_out + (2 * L.d_out if L.bias else 0)
            n_weights += L.d_in * L.d_out
    return {
        "linear_bytes": stored,
        "linear_fp16_bytes": dense,
        "linear_ratio_vs_fp16": stored / dense if dense else None,
        "bits_per_weight": 8 * stored / n_weights if n_weights else None,
    }
