"""Pydantic models of every config and input format, the ``--shards`` grammar, and mask/tensor codecs."""
