"""esam3: run the SAM3 teacher once into a Lance feature store for EfficientSAM3 distillation."""

__version__ = "0.1.0"
