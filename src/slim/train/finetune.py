"""`slim finetune`: the paper's +FT (METHOD.md §5) on a slim checkpoint, with an optional distillation term.

Only the adapters train (and, when asked, the weight quantizer's scales); the packed base weights stay frozen, so
the mask survives by construction, and quantized adapters train through their quantizer (straight-through) and
are saved quantized. The paper's defaults: 1024-token blocks of C4, a global batch of 64 by gradient accumulation,
Adafactor, a linear schedule, lr 1e-4. The run saves a resumable state every few steps, so a killed run continues
where it stopped with `--resume` (the same bytes as an uninterrupted run: the data order follows from the seed
and the step).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import FINETUNE_AUTOCAST, ConfigError
from ..pipeline.tune import autocast_dtype, close_layers, open_layers, trainable

log = logging.getLogger(__name__)

STATE = "finetune_state.pt"
OPTIMIZERS = ("adafactor", "adam")


@dataclass(frozen=True)
class FinetuneConfig:
    """What `slim finetune` trains on and how; saved in the result's slim_config.json."""

    max_tokens: int = 2_000_000  # training tokens in all (the data is repeated in epochs when it holds fewer)
    seqlen: int = 1024
    batch: int = 64  # sequences per optimizer step (the global batch), by gradient accumulation
    micro_batch: int = 4  # sequences per forward/backward
    lr: float = 1e-4
    optimizer: str = "adafactor"
    warmup: float = 0.0  # share of the steps with a linear warm-up; then linear decay to 0
    distill: float = 0.0  # weight of KL(dense || student) on the logits, added to the LM loss; 0 = off
    temperature: float = 1.0
    scales: bool = False  # also train the weight quantizer's scales (codes frozen)
    data: str = "c4"
    seed: int = 0
    save_every: int = 10  # optimizer steps between resumable states
    # "bf16-base": the compressed layers' frozen base matmuls (forward and input gradient) in bfloat16, what trains
    # in float32 (as `tune.autocast`); "bf16": that, and the rest of the forward (adapters, attention, LM head, the
    # teacher) under torch.autocast, the loss and the optimizer in float32. Faster where bf16 matmuls are (CPUs
    # with AMX, GPUs); at 1024 tokens attention is a large share of a step, which only "bf16" speeds up
    autocast: str = "none"

    def __post_init__(self) -> None:
        if self.seqlen < 2 or self.batch < 1 or self.micro_batch < 1 or self.max_tokens < self.seqlen:
            raise ConfigError("finetune: seqlen >= 2, batch and micro-batch >= 1, and max-tokens >= seqlen")
        if self.batch % self.micro_batch:
            raise ConfigError(f"finetune: the batch ({self.batch}) must be a multiple of the micro-batch "
                              f"({self.micro_batch})")
        if self.lr <= 0 or not (0.0 <= self.warmup < 1.0) or self.distill < 0 or self.temperature <= 0:
            raise ConfigError("finetune: lr > 0, warmup in [0, 1), distill >= 0 and temperature > 0")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"finetune: unknown optimizer {self.optimizer!r}; choose from {OPTIMIZERS}")
        if self.save_every < 1:
            raise ConfigError("finetune: save_every must be >= 1")
        if self.autocast not in FINETUNE_AUTOCAST:
            raise ConfigError(f"finetune: unknown autocast {self.autocast!r}; choose from {FINETUNE_AUTOCAST}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def steps(self) -> int:
        return max(1, self.max_tokens // (self.seqlen * self.batch))


def training_blocks(tokenizer, texts: list[str], seqlen: int) -> torch.Tensor:
    """The texts tokenized one by one, joined with EOS, cut into non-overlapping (n, seqlen) blocks (tail
    dropped)."""
    eos = tokenizer.eos_token_id
    parts: list[torch.Tensor] = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        parts.append(torch.tensor(ids + ([eos] if eos is not None else []), dtype=torch.long))
    flat = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
    n = flat.numel() // seqlen
    if n < 1:
        raise ConfigError(f"finetune: the training text holds {flat.numel()} tokens, less than one block of "
                          f"{seqlen}; give more text (--data) or a smaller --seqlen")
    return flat[: n * seqlen].view(n, seqlen)


def batch_order(n_blocks: int, step: int, cfg: FinetuneConfig) -> list[int]:
    """The blocks of optimizer step `step` (0-based): epochs of seeded permutations, so any step's batch follows
    from the seed alone (a resumed run reads the same data)."""
    out: list[int] = []
    perms: dict[int, list[int]] = {}
    start = step * cfg.batch
    for k in range(start, start + cfg.batch):
        epoch, pos = divmod(k, n_blocks)
        if epoch not in perms:
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            perms[epoch] = torch.randperm(n_blocks, generator=gen).tolist()
        out.append(perms[epoch][pos])
    return out


def make_optimizer(params: dict[str, nn.Parameter], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """Adam, or torch's Adafactor. torch's Adafactor scales each step by the tensor's RMS; the paper's (HF's, with
    scale_parameter=False and relative_step=False) does not, so each tensor's lr is divided by its starting RMS."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(list(params.values()), lr=cfg.lr)
    groups = [{"params": [p], "lr": cfg.lr / max(float(p.detach().pow(2).mean().sqrt()), 1e-3)}
              for p in params.values()]
    return torch.optim.Adafactor(groups, lr=cfg.lr)


def schedule(opt: torch.optim.Optimizer, cfg: FinetuneConfig) -> torch.optim.lr_scheduler.LambdaLR:
    total, warm = cfg.steps, int(cfg.warmup * cfg.steps)

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return max(0.0, (total - s) / max(total - warm, 1))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def step_loss(model: nn.Module, ids: torch.Tensor, cfg: FinetuneConfig,
              teacher: nn.Module | None) -> tuple[torch.Tensor, float, float]:
    """(loss to back-propagate, LM loss, KL) on one micro-batch. At temperature 1 the LM loss and the KL share
    the student's log-softmax (over a 49k vocabulary it is a large share of the loss's cost)."""
    fast = torch.autocast(ids.device.type, torch.bfloat16, enabled=cfg.autocast == "bf16")
    with fast:
        logits = model(ids, use_cache=False).logits[:, :-1].float()
    logits = logits.reshape(-1, logits.shape[-1])
    target = ids[:, 1:].reshape(-1)
    if teacher is None or not cfg.distill:
        lm = F.cross_entropy(logits, target)
        return lm, float(lm.detach()), 0.0
    with torch.no_grad(), fast:
        t_logits = teacher(ids, use_cache=False).logits[:, :-1].float()
    t_logits = t_logits.reshape(-1, t_logits.shape[-1])
    logp = F.log_softmax(logits, -1)
    lm = F.nll_loss(logp, target)  # = cross_entropy
    T = cfg.temperature
    if T != 1.0:
        logp, t_logits = F.log_softmax(logits / T, -1), t_logits / T
    kl = F.kl_div(logp, F.log_softmax(t_logits, -1), log_target=True, reduction="batchmean") * T * T
    return lm + cfg.distill * kl, float(lm.detach()), float(kl.detach())


def _save_state(path: Path, step: int, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
                sched: Any, fingerprint: dict[str, Any], history: list[dict[str, float]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"step": step, "params": {k: p.detach().clone() for k, p in params.items()},
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "fingerprint": fingerprint,
                "history": history}, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_state(path: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer, sched: Any,
                fingerprint: dict[str, Any]) -> tuple[int, list[dict[str, float]]]:
    from ..pipeline.stream import ResumeError

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    except Exception as e:
        raise ResumeError(f"{path} cannot be read ({e}); pass --overwrite to start over") from None
    if state.get("fingerprint") != fingerprint:
        raise ResumeError(f"{path} was written by a different run (checkpoint, options or data); pass --overwrite "
                          "to start over")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state["params"][k])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return int(state["step"]), list(state["history"])


def finetune(
    model: nn.Module, tokenizer, blocks: torch.Tensor, cfg: FinetuneConfig, state_dir: Path,
    fingerprint: dict[str, Any], teacher: nn.Module | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Train the model's adapters in place on `blocks` ((n, seqlen) token ids); a state in `state_dir` (from an
    interrupted run with the same fingerprint) is continued. Returns the training summary."""
    from ..testing.faults import fault

    torch.manual_seed(cfg.seed)
    model.train(False)  # no dropout: the LM is tuned as it will run
    base = autocast_dtype("bf16-base" if cfg.autocast == "bf16" else cfg.autocast)
    opened = open_layers(model, cfg.scales, base_dtype=base)
    if not opened:
        raise ConfigError("finetune: the model has no compressed layers")
    params = trainable(opened)
    opt = make_optimizer(params, cfg)
    sched = schedule(opt, cfg)
    state_file = state_dir / STATE
    start, history = 0, []
    if state_file.is_file():
        start, history = _load_state(state_file, params, opt, sched, fingerprint)
        log.info("resuming fine-tuning after step %d of %d", start, cfg.steps)
    n_micro = cfg.batch // cfg.micro_batch
    device = next(iter(params.values())).device  # the student's: blocks stay on the CPU, micro-batches travel
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), desc="fine-tuning", unit="step", disable=not progress, initial=start,
               total=cfg.steps)
    try:
        for step in bar:
            t_step = time.perf_counter()
            order = batch_order(blocks.shape[0], step, cfg)
            lm_sum = kl_sum = 0.0
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                for k in range(n_micro):
                    ids = blocks[order[k * cfg.micro_batch : (k + 1) * cfg.micro_batch]].to(device)
                    loss, lm, kl = step_loss(model, ids, cfg, teacher)
                    (loss / n_micro).backward()
                    lm_sum, kl_sum = lm_sum + lm / n_micro, kl_sum + kl / n_micro
            opt.step()
            sched.step()
            # each step's wall time, kept in the resumable state: a run done in pieces still reports its total
            history.append({"step": step + 1, "lm_loss": lm_sum, "kl": kl_sum,
                            "seconds": time.perf_counter() - t_step})
            done = step + 1 - start
            tok_s = done * cfg.batch * cfg.seqlen / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{lm_sum:.3f}", **({"kl": f"{kl_sum:.3f}"} if teacher is not None else {}),
                            tok_s=f"{tok_s:.0f}")
            fault("finetune")
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                _save_state(state_file, step + 1, params, opt, sched, fingerprint, history)
    finally:
        close_layers(model, opened)
    seconds = time.perf_counter() - t0
    tokens = cfg.steps * cfg.batch * cfg.seqlen
    return {"config": cfg.to_dict(), "steps": cfg.steps, "tokens": tokens,
            "epochs": tokens / blocks.numel(), "data_tokens": blocks.numel(), "seconds": seconds,
            "train_seconds": sum(h.get("seconds", 0.0) for h in history),  # all steps, over every resumed piece
            "resumed_at_step": start or None, "history": history,
            "tokens_per_second": (cfg.steps - start) * cfg.batch * cfg.seqlen / max(seconds, 1e-9)}


def check_paths(src: Path, out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse bad paths before any work: a missing checkpoint, an existing output, a partial run not asked for."""
    from ..format.checkpoint import check_output_dir, read_slim_config
    from ..pipeline.stream import check_partial

    read_slim_config(src)
    if out.resolve() == src.resolve():
        raise ConfigError(f"finetune: --out {out} is the input checkpoint; write the result elsewhere")
    check_output_dir(out, overwrite)
    check_partial(out, resume, overwrite)


def epochs_note(cfg: FinetuneConfig, n_blocks: int) -> str:
    ep = cfg.steps * cfg.batch / n_blocks
    return (f"{cfg.steps} steps x {cfg.batch} x {cfg.seqlen} tokens = {cfg.steps * cfg.batch * cfg.seqlen:,} tokens "
            f"over {n_blocks} blocks of training text ({ep:.2f} epochs{'; the text is repeated' if ep > 1 else ''})")
