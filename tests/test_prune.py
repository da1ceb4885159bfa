import pytest
import torch

from slim.algorithms.prune import make_mask, nm_mask, saliency, unstructured_mask


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 4), (1, 2)])
def test_nm_mask_exact_counts(n, m):
    s = torch.rand(16, 64)
    mask = nm_mask(s, n, m)
    assert (mask.view(16, -1, m).sum(-1) == n).all()
    # kept entries are the largest in their group
    g = s.view(16, -1, m)
    kept_min = torch.where(mask.view(16, -1, m), g, torch.inf).amin(-1)
    drop_max = torch.where(~mask.view(16, -1, m), g, -torch.inf).amax(-1)
    assert (kept_min >= drop_max).all()


def test_nm_width_not_divisible():
    with pytest.raises(ValueError, match="not divisible by M=4"):
        nm_mask(torch.rand(4, 10), 2, 4)


def test_unstructured_per_row():
    mask = unstructured_mask(torch.rand(8, 100), 0.5)
    assert (mask.sum(1) == 50).all()


def test_wanda_uses_inputs():
    w = torch.ones(1, 4)
    sum_sq = torch.tensor([1.0, 100.0, 4.0, 0.01])
    mask = make_mask(w, sum_sq, "nm", "wanda", 2, 4)
    assert mask.tolist() == [[False, True, True, False]]
    assert torch.equal(saliency(w, None, "magnitude"), w)
    with pytest.raises(ValueError):
        saliency(w, None, "wanda")
