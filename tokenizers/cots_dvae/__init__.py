"""The dVAE: frozen image tokenizers (MIM targets) and the code that makes their weights.

Imports nothing from ``cots`` (``cots`` imports it); its command line is ``cots-dvae``
(:mod:`cots.prepare.dvae_cli`).
"""

from .base import ImageTokenizer, dvae_input_size
from .dalle import DalleTokenizer

__all__ = ["DalleTokenizer", "ImageTokenizer", "dvae_input_size"]
