"""Evaluation: WikiText-2 perplexity over fixed windows and lm-eval zero-shot tasks, on any model
(dense, slim checkpoint, or a transformers model).
May import: slim.runtime, slim.format, slim.config, slim.data, slim.models, leaves.
"""
