"""Data in: shard selection, streaming sources (local or fsspec), demo data; later the Ray plan, ledger and commits."""
