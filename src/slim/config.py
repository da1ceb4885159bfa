"""Frozen configuration dataclasses, validated once at the edge (CLI, YAML, Python API).

Importing this module does not import torch (the command line's parser and `--help` depend on it): the method
registry (slim.algorithms.methods) is imported when a configuration is first validated.
May import: slim.algorithms (the method registry, lazily), leaves.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

# the built-in methods' names (slim.algorithms.methods: a method registered there later is accepted as well)
from .names import ADAPTER_METHODS, CODE_BITS, MASK_METHODS, MAX_NM_M, QUANT_METHODS, SVD_CHOICES  # noqa: F401

SUPPORTED_BITS = CODE_BITS  # what the stored layout packs (slim.format.packed): the loader's limits are the config's


def _methods() -> SimpleNamespace:
    """The method registry, imported on first validation: it imports torch, which `slim --help` must not."""
    from .algorithms.methods import ADAPTERS, MASKS, QUANTIZERS

    return SimpleNamespace(MASKS=MASKS, QUANTIZERS=QUANTIZERS, ADAPTERS=ADAPTERS)


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it and says what is allowed."""


@dataclass(frozen=True)
class SparsityConfig:
    """Which weights are removed: N:M along the input dimension, a per-row ratio, or none."""

    pattern: str = "2:4"  # "N:M", a ratio in (0, 1) such as "0.5", or "none"
    method: str = "wanda"
    jsq_mixing: float = 2.1  # JSQ: weight of its activation-range term in the pruning metric
    jsq_clip: float = 0.01  # JSQ: share of extreme input entries clipped before taking statistics

    def __post_init__(self) -> None:
        parse_pattern(self.pattern)
        masks = _methods().MASKS
        if self.method not in masks:
            raise ConfigError(f"sparsity.method: unknown mask method {self.method!r}; choose from {tuple(masks)}")
        if self.jsq_mixing < 0 or not (0.0 <= self.jsq_clip < 1.0):
            raise ConfigError("sparsity.jsq_mixing must be >= 0 and sparsity.jsq_clip in [0, 1)")

    @property
    def kind(self) -> str:
        return parse_pattern(self.pattern)[0]

    @property
    def nm(self) -> tuple[int, int]:
        kind, n, m, _ = parse_pattern(self.pattern)
        return n, m

    @property
    def ratio(self) -> float:
        return parse_pattern(self.pattern)[3]


def parse_pattern(pattern: str) -> tuple[str, int, int, float]:
    """Parse a sparsity pattern into (kind, n, m, ratio); kind is 'nm', 'unstructured' or 'dense'."""
    p = str(pattern).strip().lower()
    if p in ("none", "dense", "0", "0.0"):
        return "dense", 0, 0, 0.0
    m = re.fullmatch(r"(\d+):(\d+)", p)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if not (1 <= n < mm):
            raise ConfigError(
                f"sparsity pattern {pattern!r}: N:M keeps N of every M weights and needs 1 <= N < M "
                "(e.g. '2:4')"
            )
        if mm > MAX_NM_M:
            raise ConfigError(f"sparsity pattern {pattern!r}: M must be at most {MAX_NM_M} (the largest group the "
                              "stored layout holds)")
        return "nm", n, mm, 1.0 - n / mm
    try:
        r = float(p.rstrip("%")) / (100.0 if p.endswith("%") else 1.0)
    except ValueError:
        raise ConfigError(
            f"sparsity pattern {pattern!r} not understood: use 'N:M' (e.g. '2:4'), a ratio such as '0.5' "
            "or '50%', or 'none'"
        ) from None
    if not (0.0 < r < 1.0):
        raise ConfigError(f"sparsity ratio {pattern!r} must lie strictly between 0 and 1")
    return "unstructured", 0, 0, r


@dataclass(frozen=True)
class QuantConfig:
    """Weight quantizer: symmetric integer levels -2^(b-1)..2^(b-1)-1."""

    method: str = "slim"
    bits: int = 4
    group_size: int = 128  # group-absmax, slim-group, awq, gptq (gptq: 0 = one scale per tensor)
    outlier_fraction: float = 0.01  # slim-o: share of input channels scaled up
    outlier_factor: float = 2.0  # slim-o: factor applied to those weight columns
    error_feedback: bool = True  # OPTQ-style column updates with the Gram matrix (paper: False)
    damping: float = 0.01  # error feedback: relative damping of H
    act_order: bool = False  # error feedback: columns in order of decreasing H_jj (GPTQ's act-order)
    awq_grid: int = 20  # awq: points of the scale-exponent grid and of the clipping grid
    # omniquant: asymmetric min-max groups whose max and min are shrunk by sigmoid(logit); the logits' start
    # (OmniQuant's 4.0: factor 0.982), trained by block tuning with tune.clipping
    lwc_init: float = 4.0

    def __post_init__(self) -> None:
        quantizers = _methods().QUANTIZERS
        if self.method not in quantizers:
            raise ConfigError(f"quant.method: unknown quantizer {self.method!r}; choose from {tuple(quantizers)}")
        if quantizers[self.method].quantizes and self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"quant.bits={self.bits} is not supported; choose from {SUPPORTED_BITS}")
        if self.group_size < 0 or (self.group_size == 0 and quantizers[self.method].grouped):
            raise ConfigError(
                f"quant.group_size must be >= 1 for {self.method!r} (0 means per tensor, for gptq only), "
                f"got {self.group_size}"
            )
        if self.act_order and not self.error_feedback:
            raise ConfigError("quant.act_order orders the error-feedback pass: it needs quant.error_feedback")
        if self.awq_grid < 2:
            raise ConfigError(f"quant.awq_grid must be >= 2, got {self.awq_grid}")
        if self.damping < 0:
            raise ConfigError(f"quant.damping must be >= 0, got {self.damping}")
        if not (0.0 <= self.outlier_fraction < 1.0) or self.outlier_factor <= 0:
            raise ConfigError("quant.outlier_fraction must be in [0, 1) and quant.outlier_factor > 0")


@dataclass(frozen=True)
class AdapterConfig:
    """Closed-form low-rank adapters that absorb the compression error."""

    method: str = "fullcov"  # paper: "slim"
    rank: float = 0.1  # < 1: ratio of min(d_out, d_in); >= 1: absolute rank
    pad_to: int = 1  # round the rank up to a multiple of this (official code: 128)
    quantize: bool = True  # SLiM-LoRA^Q: 4-bit group AbsMax adapters
    bits: int = 4
    group_size: int = 128
    damping: float = 0.01  # fullcov: relative damping of the Gram matrix
    refit_rounds: int = 3  # alternate: re-fit the adapters to the re-quantized weights' error (paper: 0)
    # in each refit round, also re-choose the mask (the configured mask method) on W - B A, the weights the
    # adapters leave to the sparse part (HASSLE-free, OATS); the refit keeps the best round, mask included
    remask: bool = False
    allocation: str = "uniform"  # or "greedy": the same parameter budget per block, spread by error spectra
    svd: str = "auto"  # the fits' top-r SVD: "exact", "randomized" (subspace iteration), "auto" (randomized >= 1024)

    def __post_init__(self) -> None:
        if self.svd not in SVD_CHOICES:
            raise ConfigError(f"adapter.svd must be one of {SVD_CHOICES}, got {self.svd!r}")
        if self.allocation not in ("uniform", "greedy"):
            raise ConfigError(f"adapter.allocation must be 'uniform' or 'greedy', got {self.allocation!r}")
        if self.refit_rounds < 0:
            raise ConfigError(f"adapter.refit_rounds must be >= 0, got {self.refit_rounds}")
        if self.remask and self.refit_rounds == 0:
            raise ConfigError("adapter.remask re-chooses the mask inside the alternating refit: set "
                              "adapter.refit_rounds >= 1")
        adapters = _methods().ADAPTERS
        if self.method not in adapters:
            raise ConfigError(
                f"adapter.method: unknown adapter {self.method!r}; choose from {tuple(adapters)}"
            )
        if self.rank <= 0:
            raise ConfigError(f"adapter.rank must be > 0 (a ratio < 1 or an integer rank), got {self.rank}")
        if self.rank >= 1 and float(self.rank) != int(self.rank):
            raise ConfigError(f"adapter.rank {self.rank} >= 1 must be a whole number (an absolute rank)")
        if self.pad_to < 1:
            raise ConfigError(f"adapter.pad_to must be >= 1, got {self.pad_to}")
        if self.quantize and self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"adapter.bits={self.bits} is not supported; choose from {SUPPORTED_BITS}")
        if self.group_size < 1 or self.damping < 0:
            raise ConfigError("adapter.group_size must be >= 1 and adapter.damping >= 0")

    def rank_for(self, d_out: int, d_in: int) -> int:
        """The rank used for a d_out x d_in layer (ratio or absolute, padded, capped at min dim)."""
        full = min(d_out, d_in)
        r = int(self.rank * full) if self.rank < 1 else int(self.rank)
        r = max(r, 1)
        if self.pad_to > 1:
            r = -(-r // self.pad_to) * self.pad_to
        return min(r, full)


CALIB_AUTOCAST = ("none", "bf16")


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data: random windows of a tokenized text stream."""

    data: str = "c4"  # "c4" (the bundled sample), a local .jsonl/.txt file or directory, or a hub dataset id
    n_samples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8
    # also collect every layer's full input Gram matrix, only to report its error in that metric
    # (rel_err_final_gram) when comparing methods; the algorithms never see it; costs time
    gram_errors: bool = False
    # mixed precision for the calibration forwards (the statistics pass, the dense teacher's targets, the compressed
    # block's outputs that feed the next block): "bf16" runs them under torch.autocast in bfloat16, where its
    # matmuls are fast (GPUs, CPUs with AMX: 2.1x per SmolLM2 block here); the statistics themselves (sums, Gram
    # matrices) still accumulate in float32/float64 from the activations, and the solver is unchanged
    autocast: str = "none"

    def __post_init__(self) -> None:
        if self.n_samples < 1 or self.seqlen < 2 or self.batch_size < 1:
            raise ConfigError("calib.n_samples, calib.batch_size must be >= 1 and calib.seqlen >= 2")
        if self.autocast not in CALIB_AUTOCAST:
            raise ConfigError(f"calib.autocast: unknown {self.autocast!r}; choose from {CALIB_AUTOCAST}")


TUNE_TEACHERS = ("dense", "compressed")
TUNE_SCHEDULES = ("cosine", "constant")
TUNE_AUTOCAST = ("none", "bf16", "bf16-base")
TUNE_UNITS = ("block", "attn-mlp")
FINETUNE_AUTOCAST = ("none", "bf16-base", "bf16")


@dataclass(frozen=True)
class TuneConfig:
    """Block-wise tuning: after a block's closed-form solution, train its adapters (and optionally its quantizer
    scales) by gradient descent so that the block's outputs match the dense model's, mask and base codes frozen."""

    steps: int = 0  # optimizer steps per block (one calibration batch each); 0 = off
    epochs: int = 0  # or passes over the training batches (steps = epochs x training steps per pass); 0 = use steps
    # windows per step: slices of the calibration batches (0: a whole batch per step); small steps train better
    # per window, and slicing keeps the calibration passes at their cheaper batch size
    batch_size: int = 0
    lr: float = 3e-2  # Adam's learning rate, relative to each tensor's RMS unless lr_relative is off
    lr_relative: bool = True  # adapters' magnitudes differ by orders of magnitude between models
    schedule: str = "cosine"  # "cosine" (decayed to 0 over the steps) or "constant" (OmniQuant)
    holdout: float = 0.125  # share of the calibration batches kept out of training, to stop early (0: none)
    eval_every: int = 8  # steps between held-out measurements
    patience: int = 2  # stop after this many measurements without a better held-out loss
    # "dense": targets are the dense model's own block outputs (a dense stream runs beside the compressed one);
    # "compressed": the dense block's outputs on the compressed stream's inputs (no second stream)
    teacher: str = "dense"
    scales: bool = False  # also train the weight quantizer's scales (codes frozen)
    # also train the block's own dense parameters (its norms' weights and biases): stored in full precision
    # anyway, so tuning them costs no bits
    norms: bool = False
    # train the quantizer's clipping instead (OmniQuant's learnable weight clipping, quant.method omniquant):
    # codes and scales are recomputed from the trained clipping, the mask stays
    clipping: bool = False
    # with tune.clipping: also train AffineQuant's learnable equivalent transformation (its weight-only LLaMA-2
    # setting): per-channel scales and shifts between each norm and the linears it feeds, a q/k scale, and an
    # affine matrix per attention head between v and o, opened off the diagonal epoch by epoch (its gradual
    # mask); all folded into the stored weights, norms and biases, so the stored layout stays the same
    let: bool = False
    # also train the kept weights (3BASiL's transformer matching, EfficientQAT's block stage): shadow weights seen
    # through the layer's quantizer with straight-through rounding, the mask fixed; the codes are re-quantized from
    # them at the end (same checkpoint format)
    weights: bool = False
    # Adam's rate for the shadow weights, in units of each layer's mean quantization step (on SmolLM2 0.1 fits the
    # calibration text and 0.3 diverges; 0.01-0.015 move too few codes: docs/results/ablation/weight-tune)
    weights_lr: float = 3e-2
    # with tune.weights: after training, also try the adapters re-fitted in closed form to the final weights'
    # residual; the held-out loss decides between them and the tuned adapters (off: the tuned ones won 19 of 20
    # SmolLM2 blocks in the probes, and the candidate costs two held-out passes a block)
    adapter_refit: bool = False
    # "block": one unit, the block's output; "attn-mlp": the attention half first, against the dense block's state
    # after attention (its residual sum), then the MLP half against the block's output, each for tune.steps
    # (arXiv 2510.14444: about Pareto-optimal between per-layer and per-block reconstruction)
    units: str = "block"
    let_lr: float = 5e-3  # AffineQuant's let_lr (absolute; the clipping logits keep tune.lr)
    let_alpha: float = 0.5  # the scales' start: SmoothQuant's max|x|^alpha / max|W|^(1 - alpha)
    let_sf: float = 1.0  # AffineQuant's stability factor: weight of the opened off-diagonals
    # mixed precision for the training steps' forward and backward ("bf16": matmuls in bfloat16 under
    # torch.autocast; "bf16-base": only the frozen base weights' matmuls, the bulk of a step, everything trained
    # in float32; parameters, optimizer state and the held-out measurement stay float32 in both); pays off where
    # bfloat16 matmuls are fast (GPUs, CPUs with AMX), and costs accuracy of the gradients, not of what is stored
    autocast: str = "none"

    def __post_init__(self) -> None:
        if self.autocast not in TUNE_AUTOCAST:
            raise ConfigError(f"tune.autocast: unknown {self.autocast!r}; choose from {TUNE_AUTOCAST}")
        if (self.steps < 0 or self.epochs < 0 or self.batch_size < 0 or self.lr <= 0 or self.eval_every < 1
                or self.patience < 1):
            raise ConfigError("tune.steps, tune.epochs and tune.batch_size must be >= 0, tune.lr > 0, "
                              "tune.eval_every and tune.patience >= 1")
        if self.steps and self.epochs:
            raise ConfigError("tune.steps and tune.epochs both set: give one (epochs = passes over the batches)")
        if not (0.0 <= self.holdout < 1.0):
            raise ConfigError(f"tune.holdout must be in [0, 1), got {self.holdout}")
        if self.teacher not in TUNE_TEACHERS:
            raise ConfigError(f"tune.teacher: unknown teacher {self.teacher!r}; choose from {TUNE_TEACHERS}")
        if self.schedule not in TUNE_SCHEDULES:
            raise ConfigError(f"tune.schedule: unknown schedule {self.schedule!r}; choose from {TUNE_SCHEDULES}")
        if self.clipping and self.scales:
            raise ConfigError("tune.clipping recomputes the scales from the trained clipping: drop tune.scales")
        if self.let and not self.clipping:
            raise ConfigError("tune.let trains AffineQuant's transformation together with the learnable clipping "
                              "that requantizes the transformed weights: add tune.clipping")
        if self.weights and self.clipping:
            raise ConfigError("tune.weights and tune.clipping both re-quantize the weights (shadow weights through "
                              "fixed scales, or OmniQuant's trained clipping): choose one")
        if self.units not in TUNE_UNITS:
            raise ConfigError(f"tune.units: unknown {self.units!r}; choose from {TUNE_UNITS}")
        if self.units != "block" and self.let:
            raise ConfigError("tune.let trains one transformation across the whole block: use tune.units block")
        if self.weights_lr <= 0:
            raise ConfigError(f"tune.weights_lr must be > 0, got {self.weights_lr}")
        if self.let_lr <= 0 or not (0.0 <= self.let_alpha <= 1.0) or self.let_sf <= 0:
            raise ConfigError("tune.let_lr and tune.let_sf must be > 0 and tune.let_alpha in [0, 1]")

    @property
    def enabled(self) -> bool:
        return bool(self.steps or self.epochs)


def check_device(device: str, need: bool = True) -> str:
    """`device` if it names one slim runs on ('cpu', 'cuda', 'cuda:N'), and with `need`, one this machine has:
    refused before any loading, so a typo or a missing GPU fails at once."""
    if not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"device {device!r}: use 'cpu' or 'cuda' (or 'cuda:N')")
    if need and device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    return device


@dataclass(frozen=True)
class CompressConfig:
    """Everything that determines a compressed model; saved next to every checkpoint."""

    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    fp8_inputs: bool = False  # FP8 per-tensor input quantization (simulated on CPU)
    true_sequential: bool = False  # re-measure each group's inputs behind the already compressed groups
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_device(self.device, need=False)
        t = self.tune
        m = _methods()
        quantizer = m.QUANTIZERS[self.quant.method]
        if t.clipping and not quantizer.learnable_clipping:
            learnable = [k for k, v in m.QUANTIZERS.items() if v.learnable_clipping]
            raise ConfigError(f"tune.clipping trains a learnable clipping (OmniQuant's): quant.method "
                              f"{self.quant.method!r} has none; use quant.method {' or '.join(learnable)}")
        if t.enabled and m.ADAPTERS[self.adapter.method].fit is None and not (
                t.clipping or t.norms or t.weights or (t.scales and quantizer.quantizes)):
            raise ConfigError("block tuning trains the adapters (with tune.scales also the quantizer scales, with "
                              "tune.clipping OmniQuant's clipping): this recipe has none of them; add adapters "
                              "(--adapter fullcov) or tune.scales")
        if t.let and m.ADAPTERS[self.adapter.method].fit is not None:
            raise ConfigError("tune.let (AffineQuant's transformation) changes each layer's input space, which "
                              "closed-form adapters were fitted in: use --adapter none with it")
        if not quantizer.feedback and self.quant.error_feedback:
            raise ConfigError(f"quant.method {self.quant.method} rounds to nearest (its parameters are trained, not "
                              "fed back): turn quant.error_feedback off")

    @property
    def needs_gram(self) -> bool:
        m = _methods()
        return (self.quant.error_feedback or m.ADAPTERS[self.adapter.method].needs_gram
                or m.MASKS[self.sparsity.method].needs_gram or m.QUANTIZERS[self.quant.method].needs_gram)

    @property
    def needs_abs(self) -> bool:
        """Whether mean input magnitudes are needed (AWQ's scales, L2QER's adapters)."""
        m = _methods()
        return m.QUANTIZERS[self.quant.method].needs_abs or m.ADAPTERS[self.adapter.method].needs_abs

    @property
    def needs_jsq(self) -> bool:
        """Whether the mask method reads JSQ's clipped-activation statistics."""
        return _methods().MASKS[self.sparsity.method].needs_jsq

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompressConfig:
        return _build(cls, d, "")


_SECTIONS = {"sparsity": SparsityConfig, "quant": QuantConfig, "adapter": AdapterConfig, "calib": CalibConfig,
             "tune": TuneConfig}


def _build(cls: type, d: dict[str, Any], prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(d).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"allowed under {prefix or 'top level'}: {', '.join(sorted(names))}"
        )
    kwargs: dict[str, Any] = {}
    for k, v in d.items():
        sub = _SECTIONS.get(k) if cls is CompressConfig else None
        kwargs[k] = _build(sub, v, f"{k}.") if sub is not None else v
    try:
        return cls(**kwargs)
    except TypeError as e:  # wrong value types surface here
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml when built with it
    """PyYAML's safe loader with YAML 1.2's numbers: `1e-2` is a float (YAML 1.1 reads a string) and `2:4` is
    text (YAML 1.1 reads the base-60 integer 124), so a config file and `--set` mean what they look like."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+|0o?[0-7_]+)$"),
    list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)?\.?[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*\.(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a safe loader: plain data only


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict (validated when merged into a CompressConfig)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    data = _yaml(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: top level must be a mapping of sections")
    return data


def parse_set(items: list[str]) -> dict[str, Any]:
    """`section.key=value` assignments (the command line's `--set`) as a config dict, each value read as YAML.

    Why: the research knobs live in the config, not in flags; `--set` reaches any of them without a file. The
    keys are checked by the config's own validation (CompressConfig.from_dict), like a YAML file's."""
    d: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        path = key.strip().split(".")
        if not eq or not all(path):
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE (e.g. tune.steps=128) or KEY=VALUE for "
                              f"a top-level key; sections: {', '.join(sorted(_SECTIONS))}")
        try:
            value = _yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e})") from None
        node = d
        for name in path[:-1]:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {name} was set to a value above, not a section")
        node[path[-1]] = value
    return d


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge two config dicts; override wins."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def _load_presets() -> dict[str, dict[str, Any]]:
    """The named recipes shipped as src/slim/presets/NAME.yaml: each file says where its recipe comes from."""
    out: dict[str, dict[str, Any]] = {}
    for f in sorted(resources.files(__package__).joinpath("presets").iterdir(), key=lambda f: f.name):
        if f.name.endswith(".yaml"):
            out[f.name.removesuffix(".yaml")] = _yaml(f.read_text(encoding="utf-8"))
    return out


# --preset NAME: the paper's recipe and the methods it compares against (docs/baselines.md). The defaults (no
# preset) are slim's own recipe: full-covariance adapters, OPTQ error feedback, alternating refit.
PRESETS: dict[str, dict[str, Any]] = _load_presets()

# --block-tune: the best adapter-only block-tuning recipe measured (docs/accuracy-recovery.md; README's "default +
# block tuning" row): small tuning steps, held-out checks far apart, bfloat16 where it pays on CPUs with AMX.
# --preset tuned (presets/tuned.yaml) adds tune.weights and adapter.remask to it
BLOCK_TUNE: dict[str, Any] = {
    "tune": {"steps": 128, "batch_size": 1, "eval_every": 64, "autocast": "bf16-base"},
    "calib": {"autocast": "bf16"},
}
