"""Test-only helpers that the benchmarks in ``scripts/`` may import too (never the server itself).

- ``launch``: start and stop real ``python -m server ...`` processes on loopback ports.
- ``tiny_loras``: random-weight LoRAs for the tiny FLUX (and a Stable Diffusion one a FLUX server refuses).
- ``standin``: an engine that satisfies the worker's engine protocol without torch work, for tests of
  everything around the engine.
"""
