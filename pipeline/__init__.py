"""quantship: recipe -> plan -> cached stages -> quantized, evaluated, served model.

Importing this package has no side effects and imports nothing heavy (torch, transformers, vendors):
those live inside the functions that need them, so ``pipeline --help`` and ``pipeline validate`` are instant.
"""

__version__ = "0.1.0"
