"""Kernels and nothing else: Numba CPU kernels (``numba_*.py``) and CUDA sources (``*.cu``).

Importing this package imports nothing; each backend imports the kernel modules it needs.
"""
