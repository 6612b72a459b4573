"""Student training from the store: the PyTorch reader (``reader``, ``sampler``, ``split``); students, losses and the
stage 1/2/3 loops follow (see docs/ARCHITECTURE.md)."""
