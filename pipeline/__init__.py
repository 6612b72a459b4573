"""Data in and the plan: shard selection, streaming sources (local or fsspec), demo data, the Ray plan; the store in ``store/``."""
