"""The asymmetric closed form (prototype): W* minimizes the error against the dense stream, equal streams give W
back, and a tuned compression runs with it."""

import torch
from conftest import tiny_model

from slim.config import CompressConfig
from slim.pipeline import _asym_weight, compress_model
from slim.stats import InputStats


def _stats(x: torch.Tensor) -> InputStats:
    st = InputStats.empty(x.shape[1], True)
    st.add(x)
    return st


def test_asym_weight_solves_the_dense_stream_problem():
    g = torch.Generator().manual_seed(0)
    xc = torch.randn(512, 16, generator=g)
    xd = xc + 0.3 * torch.randn(512, 16, generator=g)
    w = torch.randn(8, 16, generator=g)
    st = _stats(xc)
    ws = _asym_weight(w, xd.double().T @ xc.double(), st, 0.0).double()
    grad = xc.double().T @ (xc.double() @ ws.T - xd.double() @ w.double().T)  # d/dW' of ||X_d W^T - X_c W'^T||^2 / 2
    assert grad.abs().max() < 1e-6 * (xd.double() @ w.double().T).abs().sum()
    assert torch.equal(_asym_weight(w, st.gram.clone(), st, 0.01), w)  # equal streams: W itself


def test_asymmetric_compression_differs_from_block_1_on():
    ids = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(1))
    out = {}
    for asym in (False, True):
        torch.manual_seed(0)
        model = tiny_model("llama", layers=2)
        cfg = CompressConfig.from_dict({"calib": {"n_samples": 16, "seqlen": 32, "batch_size": 4, "asymmetric": asym},
                                        "tune": {"steps": 4, "eval_every": 2}})
        compress_model(model, ids, cfg, progress=False)
        out[asym] = {n: p.clone() for n, p in model.state_dict().items()}
    b0 = [n for n in out[False] if n.startswith("model.layers.0.") and n.endswith("values")]
    b1 = [n for n in out[False] if n.startswith("model.layers.1.") and n.endswith("values")]
    assert b0 and all(torch.equal(out[False][n], out[True][n]) for n in b0)  # block 0: one stream
    assert any(not torch.equal(out[False][n], out[True][n]) for n in b1)
