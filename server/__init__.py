"""Darkroom: a self-hosted, Together-compatible image generation server."""

from importlib import metadata

try:
    __version__ = metadata.version("darkroom")
except metadata.PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"
