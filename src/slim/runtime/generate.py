"""Text generation with timings: prefill and decode tokens/s and peak memory, for dense and slim models alike.

A plain KV-cache loop (one forward for the prompt, then one per new token) so that prefill and decode are timed
apart; greedy by default, sampling with a seeded generator when asked. With `compile=True` the decode step runs as
gpt-fast runs it: a static KV cache (transformers' `StaticCache`, prompt + new tokens long) so that every step has
the same shapes, and the one-token forward compiled once per model and length by `torch.compile` (CUDA graphs on
CUDA), which removes most of the per-token Python and kernel-launch overhead that dominates small-batch decoding.
"""

from __future__ import annotations

import inspect
import logging
import resource
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..names import DECODE_PATHS

log = logging.getLogger(__name__)


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (since `reset_peak_rss`, where Linux allows resetting it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Restart the peak-memory count from the current resident memory (Linux: /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def encode_prompt(tokenizer, prompt: str, chat: bool = False) -> torch.Tensor:
    """Token ids (1, T) of a prompt, through the tokenizer's chat template with `chat`."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; drop --chat")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return torch.as_tensor(ids).reshape(1, -1)
    return tokenizer(prompt, return_tensors="pt").input_ids


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer, input_ids: torch.Tensor, max_new_tokens: int = 64, do_sample: bool = False,
    temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
    on_text: Callable[[str], None] | None = None, compile: bool = False, _compile_backend: str | None = None,
    decode: str = "auto",
) -> dict[str, Any]:
    """Generate up to `max_new_tokens` after `input_ids`; `on_text` receives the new text as it is decoded.

    `compile=True` decodes through a static KV cache and a `torch.compile`d one-token step (see the module
    docstring); the first call for a model and total length compiles, which is timed apart as `compile_seconds`
    and left out of the decode tokens/s; the model keeps its compiled step and last static cache for the next
    call (a new length compiles again). `_compile_backend` picks another `torch.compile` backend (tests use the
    fast-compiling "eager" / "aot_eager").

    `decode` picks the path: "lean" (slim's C++ decoder, `slim.runtime.lean`: the whole forward in one call, CPU,
    Llama-family, batch 1), "eager" (transformers' forward with its KV cache), "compile" (as `compile=True`), or
    "auto": lean where it runs, else eager (the log says why). Returns the tokens, the text, the path taken,
    prefill and decode seconds and tokens/s, `compile_seconds` (None without `compile`) and peak resident memory."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if decode not in DECODE_PATHS:
        raise ValueError(f"unknown decode path {decode!r}; choose one of: {', '.join(DECODE_PATHS)}")
    if compile:
        decode = "compile"
    lean_dec = None
    if decode in ("auto", "lean"):
        from .lean import LeanUnsupported, decoder_for

        try:
            if input_ids.shape[0] != 1:
                raise LeanUnsupported(f"the lean decode path runs one sequence, not a batch of {input_ids.shape[0]}")
            lean_dec = decoder_for(model)
            decode = "lean"
        except LeanUnsupported as e:
            if decode == "lean":
                raise
            log.info("decoding through transformers' forward: %s", e)
            decode = "eager"
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    eos = {tokenizer.eos_token_id} if stop_at_eos and tokenizer is not None and tokenizer.eos_token_id is not None \
        else set()

    def pick(logits: torch.Tensor) -> torch.Tensor:
        logits = logits[:, -1, :].float()
        if not do_sample:
            return logits.argmax(-1)
        probs = torch.softmax(logits / max(temperature, 1e-5), -1)
        if top_p < 1.0:
            sp, si = probs.sort(-1, descending=True)
            keep = sp.cumsum(-1) - sp < top_p
            probs = torch.zeros_like(probs).scatter_(-1, si, sp * keep)
        return torch.multinomial(probs, 1, generator=gen)[:, 0]

    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5.2x renamed it
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # no (prompt x vocab) logits
    compile_seconds = None
    if lean_dec is not None:
        lean_dec.reserve(ids.shape[1] + max_new_tokens)
        t0 = time.perf_counter()
        tok = pick(lean_dec.forward(ids[0], 0)[None])
        t_prefill = time.perf_counter() - t0
        pos = ids.shape[1]

        def step(tok: torch.Tensor) -> torch.Tensor:
            nonlocal pos
            logits = lean_dec.forward(tok, pos)
            pos += 1
            return pick(logits[None])
    elif decode == "compile":
        decoder = _static_decoder(model, ids, max_new_tokens, cache_kw, _compile_backend)
        compile_seconds = decoder.warm_up(model, ids)
        t0 = time.perf_counter()
        tok = pick(decoder.prefill(model, ids, keep))
        t_prefill = time.perf_counter() - t0

        def step(tok: torch.Tensor) -> torch.Tensor:
            return pick(decoder.step(model, tok))
    else:
        t0 = time.perf_counter()
        out = model(ids, use_cache=True, **keep)
        tok = pick(out.logits)
        t_prefill = time.perf_counter() - t0
        past = _cache_of(out)

        def step(tok: torch.Tensor) -> torch.Tensor:
            nonlocal past
            out = model(tok[:, None], use_cache=True, **{cache_kw: past})
            past = _cache_of(out)
            return pick(out.logits)
    new: list[int] = []
    shown = ""
    t1 = time.perf_counter()
    for i in range(max_new_tokens):
        new.append(int(tok[0]))
        if on_text is not None and tokenizer is not None:
            text = tokenizer.decode(new, skip_special_tokens=True)
            if len(text) > len(shown) and not text.endswith("\ufffd"):
                on_text(text[len(shown):])
                shown = text
        if new[-1] in eos or i == max_new_tokens - 1:
            break
        tok = step(tok)
    t_decode = time.perf_counter() - t1
    n_dec = max(len(new) - 1, 0)  # the first new token comes from the prefill forward
    return {
        "prompt_tokens": int(ids.shape[1]), "new_tokens": len(new), "tokens": new,
        "text": tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else None,
        "prefill_seconds": t_prefill, "prefill_tokens_per_s": ids.shape[1] / t_prefill,
        "decode_seconds": t_decode, "decode_tokens_per_s": n_dec / t_decode if n_dec and t_decode > 0 else None,
        "compile_seconds": compile_seconds, "decode_path": decode, "peak_rss_bytes": peak_rss_bytes(),
    }


class StaticCacheError(ValueError):
    """The model cannot decode through a static KV cache (so not with `compile=True`); the message says why."""


def _decode_step(model: nn.Module, tok: torch.Tensor, pos: torch.Tensor, cache: Any, cache_kw: str,
                 cache_position: bool) -> torch.Tensor:
    """One token through the model at position `pos`, written into the static `cache`: what gets compiled."""
    extra = {"cache_position": pos[0]} if cache_position else {}  # transformers < 5 writes the cache there
    return model(tok, position_ids=pos, use_cache=True, **{cache_kw: cache}, **extra).logits


class _StaticDecoder:
    """One model's compiled step and its static cache, kept between calls (see `_static_decoder`).

    Holds no reference to the model (it is passed in on each call), so a model that goes away takes it along. The
    step's inputs are the same tensors on every call, filled in place, and the cache is reused while the batch,
    length and dtype match: fixed addresses are what CUDA graphs replay, and unchanged guards mean no recompile."""

    def __init__(self, step: Callable[..., torch.Tensor], cudagraphs: bool, cache_kw: str, cache_position: bool,
                 options: dict[str, Any]) -> None:
        self.compiled = step
        self.cudagraphs = cudagraphs
        self.cache_kw = cache_kw
        self.cache_position = cache_position
        self.options = options
        self.key: tuple | None = None
        self.cache: Any = None
        self.warm = False
        self.tok = self.pos = torch.empty(0)

    def use(self, model: nn.Module, batch: int, length: int, device: torch.device) -> None:
        """A static cache of `length` tokens for `batch` rows: the one already held when it fits, else a new one."""
        key = (batch, length, device, next(model.parameters()).dtype)
        if key == self.key:
            return
        self.cache = None  # free the old one first
        self.cache = _new_static_cache(model, batch, length, device, key[3])
        self.key, self.warm = key, False
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)

    def _call(self, model: nn.Module) -> torch.Tensor:
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed: reuse its buffers
        return self.compiled(model, self.tok, self.pos, self.cache, self.cache_kw, self.cache_position)

    def warm_up(self, model: nn.Module, ids: torch.Tensor) -> float:
        """Compile (and record the CUDA graph of) the step on this cache, then empty the cache; returns the seconds
        it took, 0.0 when already done for this cache."""
        if self.warm:
            return 0.0
        self.cache.reset()
        t0 = time.perf_counter()
        self._eager(model, ids[:, :1], 0)  # an eager forward first: the cache allocates its tensors lazily
        for i in range(3 if self.cudagraphs else 2):  # CUDA graph trees: a warm-up run, the recording, a replay
            self.tok.copy_(ids[:, -1:])
            self.pos.fill_(1 + i)
            self._call(model)
        _sync(self.pos.device)
        dt = time.perf_counter() - t0
        self.warm = True
        log.info("decode step compiled (%s) for %d x %d tokens in %.1f s", ", ".join(
            f"{k}={v}" for k, v in self.options.items()), self.key[0], self.key[1], dt)
        return dt

    def _eager(self, model: nn.Module, ids: torch.Tensor, start: int, **kw: Any) -> Any:
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)
        extra = {"cache_position": pos} if self.cache_position else {}
        out = model(ids, position_ids=pos[None].expand(ids.shape[0], -1), use_cache=True,
                    **{self.cache_kw: self.cache}, **extra, **kw)
        if _cache_of(out) is not self.cache:
            raise StaticCacheError(f"{type(model).__name__} does not write into the static KV cache it is given "
                                   f"(it returned {type(_cache_of(out)).__name__}); run it without --compile")
        return out

    def prefill(self, model: nn.Module, ids: torch.Tensor, keep: dict[str, int]) -> torch.Tensor:
        """The prompt through the model eagerly into an emptied cache; its logits."""
        self.cache.reset()
        out = self._eager(model, ids, 0, **keep)
        self.pos.fill_(ids.shape[1])
        return out.logits

    def step(self, model: nn.Module, tok: torch.Tensor) -> torch.Tensor:
        """The next token's logits (B, 1, V) through the compiled step."""
        self.tok.copy_(tok[:, None])
        logits = self._call(model)
        self.pos.add_(1)
        return logits


_DECODERS: weakref.WeakKeyDictionary[nn.Module, _StaticDecoder] = weakref.WeakKeyDictionary()


def _static_decoder(model: nn.Module, ids: torch.Tensor, max_new_tokens: int, cache_kw: str,
                    backend: str | None) -> _StaticDecoder:
    """The model's compiled decoder (made on first use, kept while the model lives), with a static cache for
    this prompt + `max_new_tokens`."""
    _check_static_cache(model, cache_kw)
    device = ids.device
    cudagraphs = device.type == "cuda" and backend in (None, "inductor")
    options: dict[str, Any] = {"backend": backend or "inductor", "dynamic": False}
    if cudagraphs:
        options["mode"] = "reduce-overhead"
    dec = _DECODERS.get(model)
    if dec is None or dec.options != options or dec.cache_kw != cache_kw:
        # the step's code object is shared by every model: a copy per model keeps each model's compiled graphs
        # (one per cache length) under torch._dynamo's recompile limit apart from other models'
        code = _decode_step.__code__.replace()
        fn = type(_decode_step)(code, _decode_step.__globals__, f"_decode_step_{type(model).__name__}")
        cache_position = "cache_position" in inspect.signature(model.forward).parameters
        dec = _StaticDecoder(torch.compile(fn, **options), cudagraphs, cache_kw, cache_position, options)
        _DECODERS[model] = dec
    dec.use(model, ids.shape[0], ids.shape[1] + max_new_tokens, device)
    return dec


def _check_static_cache(model: nn.Module, cache_kw: str) -> None:
    """Refuse before any compiling a model that cannot run with a static cache, saying why."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    why = None
    if config is None:
        why = "it has no transformers config to size the cache from"
    elif getattr(config, "is_encoder_decoder", False):
        why = "it is an encoder-decoder model"
    elif getattr(model, "_is_stateful", False):
        why = "it keeps a recurrent state, not a KV cache"
    elif getattr(model, "_supports_static_cache", True) is False:  # transformers < 5 flags it
        why = "transformers marks it as not supporting a static cache"
    elif cache_kw not in inspect.signature(model.forward).parameters:
        why = "its forward takes no KV cache"
    if why is not None:
        raise StaticCacheError(f"{name} cannot decode with a static KV cache ({why}); run it without --compile")


def _new_static_cache(model: nn.Module, batch: int, length: int, device: torch.device, dtype: torch.dtype) -> Any:
    """transformers' StaticCache for `length` tokens (its constructor's arguments differ across versions)."""
    from transformers import StaticCache

    accepted = inspect.signature(StaticCache.__init__).parameters
    kw = {k: v for k, v in {"max_batch_size": batch, "batch_size": batch, "device": device, "dtype": dtype}.items()
          if k in accepted}
    if "max_batch_size" in kw:
        kw.pop("batch_size", None)
    try:
        return StaticCache(config=model.config, max_cache_len=length, **kw)
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise StaticCacheError(f"{type(model).__name__} cannot decode with a static KV cache ({e}); "
                               f"run it without --compile") from e


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_of(out: Any) -> Any:
    c = out.get("cache") if hasattr(out, "get") else None
    return c if c is not None else out.past_key_values
