"""Frozen image tokenizers (MIM targets) and the tools to make their weights."""
from .base import ImageTokenizer, dvae_input_size
from .dalle import DalleTokenizer

__all__ = ["DalleTokenizer", "ImageTokenizer", "dvae_input_size"]
