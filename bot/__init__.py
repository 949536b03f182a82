"""Switchboard: a Discord bot with a model-swapping backend."""
