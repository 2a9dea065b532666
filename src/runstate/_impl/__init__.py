"""runstate's engine: everything here is internal and may change without notice.

The public API is what ``runstate.__all__`` lists, plus ``runstate.torch``, ``runstate.keras``,
``runstate.jax``, and the two plug-in points: :mod:`runstate.storage` (a new storage backend)
and :mod:`runstate.adapters` (a new framework). docs/architecture.md maps the layers.
"""
