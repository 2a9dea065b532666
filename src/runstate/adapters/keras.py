"""Keras adapter: active once the program imports keras.

Keras 3 values reach runstate through :class:`runstate.keras.State`, which reads every
variable as a NumPy array and assigns it back in place; the tensors of its backend (torch or
jax) are handled by those adapters. So Keras needs nothing from the core beyond its registry
entry: this adapter is the place where Keras-specific behaviour goes if it ever does.
"""

from __future__ import annotations

from runstate.adapters.base import Adapter

__all__ = ["ADAPTER", "KerasAdapter"]


class KerasAdapter(Adapter):
    """Keras: everything through :class:`runstate.keras.State` (NumPy arrays)."""

    name = "keras"


ADAPTER = KerasAdapter()
