"""Helpers for slim's own tests that the shipped code calls into; leaf modules that import nothing from slim."""
