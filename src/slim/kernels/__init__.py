"""Compute kernels with no model knowledge: slim's C++ CPU kernels (`csrc/`, built on first use by `native`), their
`torch.library` custom ops (`ops`), and the Triton int4 x 2:4 GPU kernels (`triton`).

The backends in slim.runtime and the compressor's error-feedback loop (slim.algorithms.optq) call into these.
May import: leaves (slim.phases).
"""
