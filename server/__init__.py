"""Darkroom: a self-hosted, Together-compatible image generation server."""
