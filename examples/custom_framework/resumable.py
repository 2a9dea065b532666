"""The glue that makes tinynn resumable: one registration per class, nothing else.

tinynn's classes have no ``state_dict()``/``load_state_dict()``, so runstate is told how to
get and set their state. Instances are then saved as ``stateful`` nodes (arrays in
safetensors, the rest in the manifest) and restored **in place**, so the optimizer keeps
pointing at the model's own arrays.
"""

from __future__ import annotations

import tinynn

import runstate

CONVENTIONS = {
    tinynn.Sequential: (tinynn.Sequential.get_weights, tinynn.Sequential.set_weights),
    tinynn.SGD: (tinynn.Optimizer.save_state, tinynn.Optimizer.load_state),
    tinynn.Adam: (tinynn.Optimizer.save_state, tinynn.Optimizer.load_state),
    tinynn.RMSprop: (tinynn.Optimizer.save_state, tinynn.Optimizer.load_state),
}


def register() -> None:
    """Register tinynn's classes with runstate (once; calling again does nothing)."""
    for cls, (get_state, set_state) in CONVENTIONS.items():
        if cls not in runstate.registry:
            runstate.register(cls, get_state=get_state, set_state=set_state)


def unregister() -> None:
    """Undo :func:`register`."""
    for cls in CONVENTIONS:
        if cls in runstate.registry:
            runstate.registry.unregister(cls)
