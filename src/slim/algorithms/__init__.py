"""The method's math, free of models and files: masks (Wanda, magnitude, SparseGPT, JSQ), quantizers (SLiM-Quant,
AbsMax, GPTQ/OPTQ, AWQ, OmniQuant's clipping, AffineQuant's transform), closed-form adapters (SLiM-LoRA, naive,
full-covariance, L2QER), input statistics, and the registry (`methods`) that names them for the configuration.

Everything here takes tensors and returns tensors, so a new method is one function and one registry entry.
May import: slim.kernels, leaves (slim.names, slim.phases, slim.testing.faults).
"""
