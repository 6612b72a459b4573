"""Student training from the store (stage 1/2/3 loops, readers, losses, eval, export). Not built yet: see docs/ARCHITECTURE.md."""
