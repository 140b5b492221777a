"""Engines that load and run a (quantized) model folder; vendor imports live inside their functions."""
