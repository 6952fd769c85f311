"""Offline builders run before training: the emoji set, tar shards, token caches, written manifests.

Its command lines are ``cots-data`` (:mod:`cots.prepare.cli`) and ``cots-dvae``
(:mod:`cots.prepare.dvae_cli`). It may import ``cots.data``; ``cots.data`` never imports it.
"""
