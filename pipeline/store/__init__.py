"""The feature store: one root with its card, Lance tables, ledger, commits, snapshots and upkeep.

``Store`` (``root.py``) is the root; ``rows.py`` reads rows back with their tensors; ``claims.py`` keeps two runs
off one shard; ``check.py``, ``show.py``, ``cleanup.py`` and ``compact.py`` are the ``esam3 store`` commands.
The PyTorch reader trainers use sits on top of it in ``esam3.train``.
"""

from esam3.pipeline.store.root import Store

__all__ = ["Store"]
