"""Checkpoint formats: pack/unpack of quantized tensors and the folders that hold them, checked against the
engines' loaders (each module cites the loader source it was checked against)."""
