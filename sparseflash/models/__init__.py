"""Bundled checkpoints shipped as package data (the default model)."""
