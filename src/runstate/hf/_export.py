"""``export_pretrained``: a checkpoint's model as a Hugging Face ``from_pretrained`` directory.

Why this module exists: a runstate checkpoint stores the model under the keys of its
``state_dict()`` in ``model.safetensors`` with runstate's own checksums and manifest; the
Hugging Face side wants ``config.json`` next to a plain ``model.safetensors``. This writes
exactly those two files, after runstate checked every byte it read. Tied weights (a GPT's
``lm_head.weight``, which is ``wte.weight``) come back from the checkpoint as one tensor under
both names; each name gets its own copy in the export (safetensors refuses shared memory), and
``from_pretrained`` ties them again.
"""

from __future__ import annotations

import json
import os
from typing import Any

import runstate
from runstate import storage
from runstate.errors import CheckpointConfigError


def stored_config(tree: dict[str, Any]) -> dict[str, Any] | None:
    """The model config ``attach`` stored with a Trainer checkpoint, if any."""
    trainer = tree.get("trainer")
    if isinstance(trainer, dict) and isinstance(trainer.get("model_config"), str):
        config = json.loads(trainer["model_config"])
        return config if isinstance(config, dict) else None
    return None


def export_pretrained(
    checkpoint: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    config: Any = None,
    item: str = "model",
) -> str:
    """Write a checkpoint's model as ``config.json`` + ``model.safetensors`` for ``from_pretrained``.

    Reads only the model item (and the Trainer item holding the config), every byte checked;
    needs torch and safetensors, not transformers. Each file is replaced atomically and durably.

    Args:
        checkpoint: a checkpoint directory (``mgr.path(step)``).
        output_dir: the directory to write; created if missing, its two files replaced.
        config: the model's ``PretrainedConfig`` (or its dict). None: the config that
            :func:`runstate.hf.attach` stored with a Trainer checkpoint.
        item: the state item holding the model.

    Returns:
        ``output_dir`` as a string.

    Raises:
        CheckpointConfigError: ``item`` is not in the checkpoint or holds no tensors, or no
            config was given and the checkpoint holds none.
        CorruptCheckpointError: the checkpoint is damaged.

    Example:
        >>> runstate.hf.export_pretrained(mgr.path(mgr.latest_step()), "export")  # doctest: +SKIP
    """
    names = list(runstate.inspect(checkpoint).items)  # the manifest only
    if item not in names:
        raise CheckpointConfigError(
            f"export_pretrained: {os.fspath(checkpoint)!r} has no item {item!r} (its items: "
            f"{', '.join(names)}); pass item=..."
        )
    tree: dict[str, Any] = {item: None}
    if "trainer" in names:
        tree["trainer"] = None
    runstate.load(checkpoint, tree, exclude=[name for name in names if name not in tree])  # reads these only
    weights = tree[item]
    if not isinstance(weights, dict) or not weights:
        raise CheckpointConfigError(
            f"export_pretrained: item {item!r} of {os.fspath(checkpoint)!r} holds no model weights"
        )
    if config is None:
        config = stored_config(tree)
        if config is None:
            raise CheckpointConfigError(
                f"export_pretrained: {os.fspath(checkpoint)!r} holds no model config; pass config=model.config"
            )
    if not isinstance(config, dict):
        config = json.loads(config.to_json_string())
    return _write(output_dir, config, _unshared(_flat(weights)))


def _write(output_dir: str | os.PathLike[str], config: dict[str, Any], tensors: dict[str, Any]) -> str:
    """Write ``config.json`` and ``model.safetensors`` into ``output_dir``, each atomically and durably."""
    from safetensors.torch import save_file

    out = storage.LocalStore(output_dir)
    storage.makedirs_durable(out.location)
    with storage.atomic_file(out.join("config.json")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    with storage.atomic_file(out.join("model.safetensors")) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    return out.location


def _flat(weights: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    import torch

    flat: dict[str, Any] = {}
    for key, value in weights.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            flat[name] = value
        elif isinstance(value, dict):
            flat.update(_flat(value, f"{name}."))
        else:
            raise CheckpointConfigError(f"export_pretrained: {name!r} is a {type(value).__qualname__}, not a tensor")
    return flat


def _unshared(tensors: dict[str, Any]) -> dict[str, Any]:
    """Contiguous tensors, a copy for every name after the first that shares memory."""
    seen: set[int] = set()
    result: dict[str, Any] = {}
    for name, value in tensors.items():
        key = value.untyped_storage().data_ptr()
        result[name] = value.contiguous() if key not in seen else value.clone().contiguous()
        seen.add(key)
    return result
