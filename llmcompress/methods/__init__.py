"""Compression algorithms as pure tensor functions: no hooks, no model walking, no I/O."""
