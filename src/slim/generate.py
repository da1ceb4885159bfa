"""Text generation with timings: prefill and decode tokens/s and peak memory, for dense and slim models alike.

A plain KV-cache loop (one forward for the prompt, then one per new token) so that prefill and decode are timed
apart; greedy by default, sampling with a seeded generator when asked.
"""

from __future__ import annotations

import inspect
import logging
import resource
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

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
    on_text: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Generate up to `max_new_tokens` after `input_ids`; `on_text` receives the new text as it is decoded.

    Returns the tokens, the text, prefill and decode seconds and tokens/s, and peak resident memory."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
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
    new: list[int] = []
    shown = ""
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, **keep)
    tok = pick(out.logits)
    t_prefill = time.perf_counter() - t0
    past = _cache_of(out)
    t1 = time.perf_counter()
    for step in range(max_new_tokens):
        new.append(int(tok[0]))
        if on_text is not None and tokenizer is not None:
            text = tokenizer.decode(new, skip_special_tokens=True)
            if len(text) > len(shown) and not text.endswith("\ufffd"):
                on_text(text[len(shown):])
                shown = text
        if new[-1] in eos or step == max_new_tokens - 1:
            break
        out = model(tok[:, None], use_cache=True, **{cache_kw: past})
        past = _cache_of(out)
        tok = pick(out.logits)
    t_decode = time.perf_counter() - t1
    n_dec = max(len(new) - 1, 0)  # the first new token comes from the prefill forward
    return {
        "prompt_tokens": int(ids.shape[1]), "new_tokens": len(new), "tokens": new,
        "text": tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else None,
        "prefill_seconds": t_prefill, "prefill_tokens_per_s": ids.shape[1] / t_prefill,
        "decode_seconds": t_decode, "decode_tokens_per_s": n_dec / t_decode if n_dec and t_decode > 0 else None,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _cache_of(out: Any) -> Any:
    c = out.get("cache") if hasattr(out, "get") else None
    return c if c is not None else out.past_key_values
