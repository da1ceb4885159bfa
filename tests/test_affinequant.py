"""AffineQuant's learnable equivalent transformation (the wanda-affinequant preset): an identity of the float
model for any parameter values (GQA, RoPE, biases, OPT), what is stored equals what was trained, gradients
reach every transformation parameter, training lowers the error, the mask survives, bad options fail."""

from types import SimpleNamespace

import pytest
import torch
from conftest import compress_tiny, slim_layers, tiny_model
from torch import nn

from slim.algorithms.affine import AffineTransform, gradual_mask, heads_of, let_map
from slim.config import PRESETS, CompressConfig, ConfigError, merge
from slim.export.formats import ExportError, export
from slim.format.checkpoint import save
from slim.format.packed import SlimLinear
from slim.pipeline.tune import close_layers, open_layers
from slim.runtime import cpu_int4
from slim.runtime.loader import load


def _randomize(t: AffineTransform, gen: torch.Generator) -> None:
    """Parameters far from their start, with the v/o matrices fully open."""
    with torch.no_grad():
        for p in t.scales:
            p.copy_(0.5 + torch.rand(p.shape, generator=gen))
        for p in t.shifts:
            p.copy_(torch.randn(p.shape, generator=gen))
        t.A.add_(0.2 * torch.randn(t.A.shape, generator=gen))
        t.shift_v.copy_(torch.randn(t.shift_v.shape, generator=gen))
        if t.qk is not None:
            t.qk.copy_(0.5 + torch.rand(t.qk.shape, generator=gen))
    t.epoch = t.epochs - 1


@pytest.mark.parametrize("kind", ["llama", "qwen2", "opt"])
def test_transformation_is_an_identity_of_the_float_model(kind):
    """Every linear's transformed weight and bias, the norms divided by the scales and the shifts moved into the
    biases: the float model's logits do not change (random parameters, grouped-query heads, rotary q/k, Qwen2's
    q/k/v biases, OPT's LayerNorm biases)."""
    model = tiny_model(kind)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
    gen = torch.Generator().manual_seed(0)
    layers = model.model.decoder.layers if kind == "opt" else model.model.layers
    for block in layers:
        m = let_map(block)
        lins = {n: block.get_submodule(n) for n in m.biased}
        fake = {n: SimpleNamespace(base=lin.weight.detach().clone(), keep=torch.ones_like(lin.weight),
                                   bias=None if lin.bias is None else lin.bias.detach().clone())
                for n, lin in lins.items()}
        act = {n: torch.rand(lin.in_features, generator=gen) + 0.1 for n, lin in lins.items()}
        t = AffineTransform(block, fake, model.config, act, alpha=0.5, sf=1.0, epochs=4)
        _randomize(t, gen)
        with torch.no_grad():
            new = t.transformed()
            for n, (w, b, t_in) in new.items():
                lin = lins[n]
                if t_in is not None:  # what fold does, on float weights: 1/s into the norm, the shift into b
                    shift, s = t_in
                    b = b - w @ (shift / s)
                lin.weight.copy_(w)
                lin.bias = nn.Parameter(b)
            for norm_name, fed in m.norms:
                s = new[fed[0]][2][1]
                norm = block.get_submodule(norm_name)
                norm.weight.div_(s)
                if getattr(norm, "bias", None) is not None:
                    norm.bias.div_(s)
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-4)


def test_gradual_mask_opens_epoch_by_epoch():
    assert torch.equal(gradual_mask(0, 20, 8, 0.5), torch.eye(8))
    full = gradual_mask(19, 20, 8, 0.5)
    assert torch.equal(full.diagonal(), torch.ones(8)) and float(full[0, 7]) == 0.5
    mid = gradual_mask(10, 20, 8, 1.0)  # int(7 / 19 * 10) + 1 = 4 diagonals: |i - j| < 4
    assert float(mid[0, 3]) == 1.0 and float(mid[0, 4]) == 0.0


def test_stored_block_computes_what_was_trained_and_gradients_reach_everything():
    """A block opened with random transformation parameters: its training forward (fake-quantized transformed
    weights, input transforms) equals the stored block's after settle/close/fold; one backward reaches the
    scales, shifts, the open entries of A (not the closed ones), the q/k scale and the clipping logits."""
    model, dense, _, _ = compress_tiny("wanda-affinequant", 0)
    block, dblock = model.model.layers[0], dense.model.layers[0]
    m = let_map(block)
    sources = {n: lin.weight.detach() for n, lin in dblock.named_modules() if isinstance(lin, nn.Linear)}
    slims = {n: mod for n, mod in block.named_modules() if isinstance(mod, SlimLinear)}
    opened = open_layers(block, False, sources)
    x = torch.randn(2, 12, model.config.hidden_size)
    pos = torch.arange(12)[None]
    rot = model.model.rotary_emb(x, pos)
    t = AffineTransform(block, opened, model.config,
                        {n: torch.rand(mod.in_features) + 0.1 for n, mod in slims.items()}, 0.5, 1.0, 4)
    _randomize(t, torch.Generator().manual_seed(0))
    t.epoch = 1  # a partly open mask: some entries of A get no gradient
    t.apply()
    out = block(x, position_embeddings=rot)
    y = out[0] if isinstance(out, tuple) else out
    y.pow(2).sum().backward()
    for p in [*t.scales, *t.shifts, t.shift_v, t.qk] + [o.up for o in opened.values()]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    closed = gradual_mask(1, 4, heads_of(model.config)[2], 1.0) == 0
    assert bool((t.A.grad[:, closed] == 0).all()) and t.A.grad[:, ~closed].abs().sum() > 0
    t.zero_grad()
    for o in opened.values():
        o.up.grad = o.low.grad = None
    t.epoch = t.epochs - 1
    with torch.no_grad():
        t.apply()
        out = block(x, position_embeddings=rot)
        want = out[0] if isinstance(out, tuple) else out
        t.settle()
        close_layers(block, opened)
        t.fold(block)
        out = block(x, position_embeddings=rot)
        got = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    for n, mod in block.named_modules():
        if isinstance(mod, SlimLinear):
            assert torch.equal(mod.mask(), slims[n].mask()), n
            assert (mod.bias is not None) == (n in m.biased), n


def test_affinequant_training_lowers_the_error_and_keeps_the_mask(tmp_path):
    """Three epochs against the dense blocks: the model's last hidden states move closer to the dense model's
    than at the transformation's start (the same run with no steps), block 0's masks (same inputs either way)
    are the Wanda masks, the biases the shifts need exist only where the transformation put them, and the
    saved checkpoint loads (with those biases) to the same logits (the int4 kernel's: within bf16 rounding)."""
    closed, dense, ids, _ = compress_tiny("wanda-affinequant", 0)
    tuned, _, _, rep = compress_tiny("wanda-affinequant", 3)

    def err(m) -> float:
        with torch.no_grad():
            a = m(ids, output_hidden_states=True).hidden_states[-1]
            b = dense(ids, output_hidden_states=True).hidden_states[-1]
        return float((a - b).pow(2).sum() / b.pow(2).sum())

    assert err(tuned) < 0.95 * err(closed)
    assert {v["block_tune"]["steps"] for v in rep["layers"].values()} == {3 * 16}
    for n, mod in slim_layers(tuned).items():
        if ".layers.0." in n:
            assert torch.equal(mod.mask(), slim_layers(closed)[n].mask()), n
        assert (mod.bias is None) == n.endswith("down_proj"), n
    save(tuned, tmp_path / "ck")
    with torch.no_grad():
        want = tuned(ids[:2]).logits
        torch.testing.assert_close(load(tmp_path / "ck", backend="reference")(ids[:2]).logits, want)
    with pytest.raises(ExportError, match="bias"):  # transformers' LLaMA has no place for them
        export(tmp_path / "ck", tmp_path / "merged", "merged")
    assert not (tmp_path / "merged").exists()
    with torch.no_grad():
        if cpu_int4.available("cpu") is None:  # bf16 activations in its kernel: ~2^-8 relative
            got = load(tmp_path / "ck", backend="cpu-int4")(ids[:2]).logits
            assert float((got - want).abs().max() / want.abs().max()) < 2e-2


def test_bad_affinequant_options():
    with pytest.raises(ConfigError, match="tune.clipping"):
        CompressConfig.from_dict(merge(PRESETS["wanda-affinequant"], {"tune": {"clipping": False}}))
    with pytest.raises(ConfigError, match="adapter none"):
        CompressConfig.from_dict(merge(PRESETS["wanda-affinequant"], {"adapter": {"method": "slim"}}))
    with pytest.raises(ConfigError, match="let_lr"):
        CompressConfig.from_dict(merge(PRESETS["wanda-affinequant"], {"tune": {"let_lr": 0.0}}))
