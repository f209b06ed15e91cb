"""Pipecat adapter: the only package that imports pipecat."""
