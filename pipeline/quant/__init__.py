"""Quantization algorithms: plain tensor functions (torch only), separate from the code that walks a model."""
