"""What a compressed layer is, in memory and on disk: the stored `Layout`, bit packing, `SlimLinear` (the reference
module every backend starts from), the checkpoint's files (safetensors + slim_config.json, written aside and
renamed), and its model card.

The format knows bytes, not kernels: reading a checkpoint into a runnable model is slim.runtime.loader's job.
May import: slim.algorithms (code ranges), slim.config, slim.models, leaves.
"""
