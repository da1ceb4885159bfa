"""slim's version: a leaf module, so that modules the package root imports can read it without importing the root.

May import: nothing from slim.
"""

__version__ = "0.1.0"
