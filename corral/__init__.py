"""Corral: build your own ChatGPT-style assistant from an open model."""

__version__ = "0.1.0"
