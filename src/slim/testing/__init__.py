"""Helpers for tests and benchmarks: fault injection (`faults`, a leaf the shipped code calls at its kill points)
and random compressed layers and models (`random_layers`). Nothing here runs in a normal compression or load.
May import: anything in slim (`faults` itself imports nothing from slim).
"""
