"""Training after compression: `slim finetune` tunes a checkpoint's adapters (and optionally scales) end to end
against the dense model, resumable, with the frozen base in its packed form.
May import: slim.pipeline (block tuning's trainable views, resume checks), slim.runtime, slim.format,
slim.algorithms, slim.config, slim.data, slim.models, leaves.
"""
