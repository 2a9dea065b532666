"""Keras 3: the state of a model, its optimizer and metrics, and a ``fit`` callback that
resumes mid-epoch exactly.

Why this exists: Keras' own ``BackupAndRestore`` restarts an interrupted epoch from its first
batch, so a resumed ``fit`` trains some batches twice and ends with other weights than an
uninterrupted one. :class:`Checkpoint` records the position inside the epoch (on TensorFlow,
the state of the ``tf.data`` iterator ``fit`` reads from) and resumes exactly there.

* :class:`State` is a Stateful: every variable of the model (weights, non-trainable
  statistics, the states of the seed generators that drive dropout), of its optimizer
  (iteration count, moments, learning rate), of its metrics and Keras' global seed
  generator, as NumPy arrays, restored in place with ``assign``. Use it in custom training
  loops (``GradientTape``, torch, or JAX with ``stateless_call``).
* :class:`Checkpoint` is a ``keras.callbacks.Callback`` for ``model.fit``
  (:mod:`runstate.keras.fit`).

Works on the TensorFlow and torch backends (``Checkpoint`` is not available on the JAX
backend, whose ``fit`` keeps the variables outside the model between steps). This module
imports keras, on first use of ``runstate.keras`` (``import runstate`` imports no framework).
"""

from __future__ import annotations

from runstate.keras.fit import Checkpoint
from runstate.keras.state import State

__all__ = ["Checkpoint", "State"]
