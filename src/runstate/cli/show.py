"""``runstate show CKPT``: what a checkpoint holds, from its manifest alone.

Items with their type, tensor count and size; totals per dtype; each optimizer's type and
the hyper-parameters of its param groups; each scheduler's last learning rate; whether the
random generators were saved; each data loader's position; step, metrics and the versions
that wrote it. ``--tensors`` lists every tensor. No tensor data is read and nothing from the
checkpoint is constructed. CKPT is a checkpoint directory, or a run directory with ``--step N``
or ``--step latest``.
"""

from __future__ import annotations

import argparse
from typing import Any

import runstate
from runstate.cli._commands import add_command, add_json_option
from runstate.cli._output import format_time, format_value, guarded, human_bytes, print_json, print_table
from runstate.cli._paths import add_step_option, resolve_checkpoint

__all__ = ["describe", "register"]


def _optimizers(contents: runstate.CheckpointContents) -> list[dict[str, Any]]:
    out = []
    for item in contents.items.values():
        v = item.value
        if isinstance(v, dict) and isinstance(v.get("param_groups"), list) and "state" in v:
            groups = []
            for group in v["param_groups"]:
                if isinstance(group, dict):
                    params = group.get("params")
                    hyper = {k: x for k, x in group.items() if k != "params"}
                    groups.append({"params": len(params) if isinstance(params, list) else None, **hyper})
            out.append({"item": item.name, "type": item.type, "param_groups": groups})
    return out


def _schedulers(contents: runstate.CheckpointContents) -> list[dict[str, Any]]:
    out = []
    for item in contents.items.values():
        v = item.value
        if isinstance(v, dict) and "_last_lr" in v:
            out.append(
                {
                    "item": item.name,
                    "type": item.type,
                    "last_lr": v["_last_lr"],
                    "last_epoch": v.get("last_epoch"),
                }
            )
    return out


def _objects(value: Any, path: str, out: list[dict[str, Any]]) -> None:
    if isinstance(value, runstate.ObjectSummary):
        out.append({"where": path, "kind": value.kind})
    elif isinstance(value, dict):
        for k, v in value.items():
            _objects(v, f"{path}.{k}", out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _objects(v, f"{path}.{i}", out)


def _rng(contents: runstate.CheckpointContents) -> dict[str, Any]:
    global_rng: list[dict[str, Any]] = []
    generators: list[dict[str, Any]] = []
    for item in contents.items.values():
        if item.type == "runstate.rng.RNG" and isinstance(item.value, dict):
            saved = [k for k in ("python", "numpy") if k in item.value]
            torch_state = item.value.get("torch")
            if isinstance(torch_state, dict):
                saved.append("torch")
                cuda = torch_state.get("cuda")
                if isinstance(cuda, list) and cuda:
                    saved.append(f"cuda x{len(cuda)}")
            global_rng.append({"item": item.name, "generators": saved})
        else:
            _objects(item.value, item.name, generators)
    return {"saved": bool(global_rng or generators), "global": global_rng, "generators": generators}


def _loaders(contents: runstate.CheckpointContents) -> list[dict[str, Any]]:
    out = []
    for item in contents.items.values():
        v = item.value
        if not (isinstance(v, dict) and "_num_yielded" in v):
            continue
        iter_state = v.get("_sampler_iter_state")
        sampler = v.get("_index_sampler_state")
        samples = None
        if isinstance(iter_state, dict):
            samples = iter_state.get("samples_yielded")
            sampler = iter_state.get("sampler_state", sampler)
        out.append(
            {
                "item": item.name,
                "type": item.type,
                "batches_yielded": v["_num_yielded"],
                "samples_yielded": samples,
                "sampler": sampler if isinstance(sampler, dict) else None,
                "finished": v.get("_iterator_finished"),
            }
        )
    return out


def _dtypes(contents: runstate.CheckpointContents) -> dict[str, dict[str, int]]:
    totals: dict[str, dict[str, int]] = {}
    for t in contents.tensors:
        entry = totals.setdefault(t.dtype, {"tensors": 0, "nbytes": 0})
        entry["tensors"] += 1
        entry["nbytes"] += t.nbytes
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]["nbytes"]))


def describe(contents: runstate.CheckpointContents, *, tensors: bool = False) -> dict[str, Any]:
    """The facts ``show`` prints, as plain data (what ``--json`` prints)."""
    out: dict[str, Any] = {
        "path": contents.path,
        "step": contents.step,
        "created": contents.created,
        "nbytes": contents.nbytes,
        "files": len(contents.files) + 1,
        "metrics": contents.metrics,
        "versions": contents.versions,
        "format_version": contents.format_version,
        "items": [
            {
                "name": item.name,
                "kind": item.kind,
                "type": item.type,
                "tensors": len(item.tensors),
                "nbytes": item.nbytes,
                "files": list(item.files),
                "value": item.value if item.kind == "value" and not isinstance(item.value, (dict, list)) else None,
            }
            for item in contents.items.values()
        ],
        "dtypes": _dtypes(contents),
        "optimizers": _optimizers(contents),
        "schedulers": _schedulers(contents),
        "rng": _rng(contents),
        "loaders": _loaders(contents),
    }
    if tensors:
        out["tensors"] = [
            {
                "item": t.item,
                "name": t.name,
                "dtype": t.dtype,
                "shape": list(t.shape),
                "nbytes": t.nbytes,
                "file": t.file,
            }
            for t in contents.tensors
        ]
    return out


def _short_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _training_state(d: dict[str, Any]) -> list[list[str]]:
    """The "training state" rows: schedulers, random generators, data-loader positions."""
    lines: list[list[str]] = []
    for s in d["schedulers"]:
        last = s["last_lr"]
        lrs = ", ".join(format_value(x) for x in last) if isinstance(last, list) else format_value(last)
        lines.append(
            [
                f"scheduler '{s['item']}'",
                f"{_short_type(s['type'])}: last lr {lrs} (last_epoch {format_value(s['last_epoch'])})",
            ]
        )
    rng = d["rng"]
    for g in rng["global"]:
        lines.append(["rng", f"runstate.RNG in '{g['item']}': {', '.join(g['generators'])}"])
    for g in rng["generators"]:
        lines.append(["rng", f"{g['kind']} at {g['where']}"])
    if not rng["saved"]:
        lines.append(["rng", "not saved: random draws after a resume will differ"])
    for ld in d["loaders"]:
        where = f"{format_value(ld['batches_yielded'])} batches into the epoch"
        if ld["samples_yielded"] is not None:
            where += f" ({format_value(ld['samples_yielded'])} samples)"
        if ld["finished"]:
            where += ", epoch finished"
        if ld["sampler"]:
            where += "; sampler " + " ".join(f"{k}={format_value(v)}" for k, v in ld["sampler"].items())
        lines.append([f"data loader '{ld['item']}'", where])
    return lines


def _print_human(d: dict[str, Any]) -> None:
    versions = ", ".join(f"{k} {v}" for k, v in d["versions"].items())
    summary = [
        ["checkpoint", d["path"]],
        ["step", "none" if d["step"] is None else format_value(d["step"])],
        ["created", format_time(d["created"]) + " UTC"],
        ["size", f"{human_bytes(d['nbytes'])} in {d['files']} files"],
        ["metrics", "  ".join(f"{k}={format_value(v)}" for k, v in d["metrics"].items()) or "none"],
        ["written by", versions],
    ]
    print_table(["", ""], summary, header=False)

    rows = []
    for item in d["items"]:
        value = "" if item["value"] is None else format_value(item["value"])
        rows.append([item["name"], item["type"], str(item["tensors"]), human_bytes(item["nbytes"]), value])
    print_table(["item", "type", "tensors", "size", "value"], rows, title="items", right=(2, 3))

    if d["dtypes"]:
        rows = [[k, str(v["tensors"]), human_bytes(v["nbytes"])] for k, v in d["dtypes"].items()]
        print_table(["dtype", "tensors", "size"], rows, title="tensors by dtype", right=(1, 2))

    for opt in d["optimizers"]:
        groups = opt["param_groups"]
        keys = list(dict.fromkeys(k for g in groups for k in g))
        rows = [[k, *(format_value(g.get(k, "")) for g in groups)] for k in keys]
        title = f"optimizer '{opt['item']}': {opt['type']}, {len(groups)} param group{'s' if len(groups) != 1 else ''}"
        print_table(["hyper-parameter", *(f"group {i}" for i in range(len(groups)))], rows, title=title)

    lines = _training_state(d)
    if lines:
        print_table(["", ""], lines, title="training state", header=False)

    if "tensors" in d:
        rows = [
            [t["item"], t["name"], t["dtype"], str(t["shape"]), human_bytes(t["nbytes"]), t["file"]]
            for t in d["tensors"]
        ]
        print_table(["item", "tensor", "dtype", "shape", "size", "file"], rows, title="tensors", right=(4,))


@guarded("show")
def _show(args: argparse.Namespace) -> int:
    path = resolve_checkpoint("show", args.ckpt, args.step)
    if isinstance(path, int):
        return path
    contents = runstate.inspect(path)
    described = describe(contents, tensors=args.tensors)
    if args.json:
        print_json(described)
    else:
        _print_human(described)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``show`` subcommand."""
    p = add_command(
        sub, "show", _show, help="show what a checkpoint holds (from its manifest; reads no tensor data)", doc=__doc__
    )
    p.add_argument(
        "ckpt",
        metavar="CKPT",
        help="a checkpoint directory (runs/exp/step-000000001000), or a run directory with --step",
    )
    add_step_option(p)
    p.add_argument("--tensors", action="store_true", help="also list every tensor with its dtype, shape and size")
    add_json_option(p)
