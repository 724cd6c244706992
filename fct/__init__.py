"""fct: compatible embedding-model updates for image retrieval."""

__version__ = "0.1.0"
