"""What a training run reads: manifests, images and crops, datasets, shards, token caches, the caption tokenizer.

Imports nothing from ``cots.prepare`` (the offline builders) or ``cots.models``
(``tests/test_import_rules.py`` checks it).
"""
