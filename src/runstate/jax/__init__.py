"""JAX: what a JAX program needs beyond ``runstate.save``/``load`` and the manager.

Why this exists: JAX values are immutable, so runstate cannot restore a JAX state in place the
way it loads a torch module. A JAX training state is kept as a dict of pytrees (dicts, lists,
tuples, NamedTuples such as optax states, ``None``) whose leaves are ``jax.Array``, typed or raw
PRNG keys and Python numbers; ``mgr.restore(state)`` *replaces* each item in that dict, after
checking that the stored pytree has the live one's structure, shapes and dtypes::

    state = {"params": params, "opt_state": tx.init(params), "key": jax.random.key(0), "step": 0}
    mgr.restore(state)                      # then read the values back from the dict
    params, opt_state = state["params"], state["opt_state"]

How leaves are stored (docs/frameworks.md has the full table):

* ``jax.Array``: like a NumPy array (any dtype, bfloat16 and float8 included), rebuilt as a
  ``jax.Array`` on the device/sharding of the live array it replaces; weak types are kept.
* typed keys (``jax.random.key``, any implementation): the key data plus the implementation
  name, rebuilt with ``jax.random.wrap_key_data``. Raw ``uint32`` keys are ordinary arrays.
* NamedTuple classes come back from the live value only (never imported from the checkpoint):
  ``runstate.load(path)`` without a state returns plain tuples; :func:`place_like` puts such a
  tree on the live shardings, :func:`mismatches` says where it differs from a live tree.

This module imports jax on first use of ``runstate.jax`` (``import runstate`` imports no
framework). It re-exports the JAX adapter's checks; the adapter itself
(``runstate.adapters.jax``) is internal.
"""

from __future__ import annotations

from typing import Any

import jax

from runstate.adapters import jax as _adapter
from runstate.errors import StateMismatchError

__all__ = ["is_key", "mismatches", "place_like"]


def is_key(value: Any) -> bool:
    """Whether ``value`` is a typed PRNG key array, stored with its implementation name.

    Args:
        value: any value.

    Returns:
        True for ``jax.random.key(...)`` arrays; False for raw ``uint32`` keys
        (``jax.random.PRNGKey``), which are stored as ordinary arrays.

    Example:
        >>> runstate.jax.is_key(jax.random.key(0)), runstate.jax.is_key(jax.random.PRNGKey(0))  # doctest: +SKIP
        (True, False)
    """
    return bool(_adapter.is_key(value))


def mismatches(live: Any, restored: Any) -> list[str]:
    """Where a restored pytree differs from the live one (structure, leaf type, shape, dtype).

    ``mgr.restore`` and ``runstate.load(path, state)`` run this check on every item and raise
    ``StateMismatchError``; use it on a tree read with ``runstate.load(path)``.

    Args:
        live: the live pytree (its ``jax.Array`` leaves are compared).
        restored: the pytree read from a checkpoint.

    Returns:
        One line per difference, e.g. ``"tree['w']: shape (4,) in checkpoint, (3,) live"``; empty when they match or ``live`` holds
        no ``jax.Array``.
    """
    problems = _adapter.check_like(live, restored)
    return ["tree" + "".join(f"[{key!r}]" for key in path) + f": {message}" for path, _kind, message in problems]


def place_like(restored: Any, live: Any) -> Any:
    """``restored`` with each array put on the device/sharding of the matching live array.

    Leaves are matched in order, so a tree read without a live state (NamedTuples as plain
    tuples) can be placed like the live tree it was saved from.

    Args:
        restored: a pytree read from a checkpoint (e.g. ``runstate.load(path)["params"]``).
        live: a pytree with as many leaves, whose arrays are where they should go.

    Returns:
        ``restored``'s structure with placed leaves (arrays already in place are kept as they are).

    Raises:
        StateMismatchError: the trees have different numbers of leaves (see :func:`mismatches`).
    """
    leaves, treedef = jax.tree_util.tree_flatten(restored)
    templates = jax.tree_util.tree_leaves(live)
    if len(leaves) != len(templates):
        raise StateMismatchError(
            f"place_like: {len(leaves)} leaves restored, {len(templates)} live; "
            "pass the live tree the checkpoint was saved from (runstate.jax.mismatches says where they differ)"
        )
    placed = [_adapter.place_like(leaf, template) for leaf, template in zip(leaves, templates, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, placed)
