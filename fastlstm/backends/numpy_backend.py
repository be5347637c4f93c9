"""The NumPy backend: the reference implementation of ``base`` on NumPy; always available."""

from __future__ import annotations

import numpy as np

from .base import ReferenceBackend


class NumpyBackend(ReferenceBackend):
    name = "numpy"
    xp = np


def create_backend() -> NumpyBackend:
    return NumpyBackend()
