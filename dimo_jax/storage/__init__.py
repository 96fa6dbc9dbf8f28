"""Checkpoints on disk and loading trained or converted models from a folder."""
