"""Metadata cost of multi-process checkpoints as the world size grows (docs/scaling.md).

No processes are started: the parts that N ranks would hand to rank 0 are built synthetically
(T sharded tensors, each split in N row blocks, plus per-rank RNG items), then rank 0's merge,
the manifest's size and the time to parse and validate it are measured, exactly as
``runstate._impl.parts`` and ``CheckpointReader`` do them.

    python benchmarks/scaling.py [--tensors 200] [--ranks 2 8 64 256 1024]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from runstate._impl.parts import merge
from runstate.format.manifest import Manifest, RankInfo, per_rank_name


def parts_for(ranks: int, tensors: int, rows: int = 4096, cols: int = 1024) -> list[dict[str, Any]]:
    parts = []
    block = rows // ranks if rows >= ranks else 1
    for r in range(ranks):
        fname = f"model.rank{r:05d}.safetensors"
        entries: dict[str, Any] = {}
        chunks: dict[str, Any] = {}
        offset = 0
        for t in range(tensors):
            name = f"layers.{t}.weight"
            start = r * block
            n = block * cols * 2
            part = f"{name}@{start},0"
            entries[part] = {
                "file": fname,
                "dtype": "BF16",
                "shape": [block, cols],
                "data_offsets": [offset, offset + n],
                "xxh3": "0123456789abcdef",
                "lib": "torch",
                "device": f"cuda:{r % 8}",
            }
            offset += n
            chunks[name] = {
                "dtype": "BF16",
                "shape": [block * ranks, cols],
                "lib": "torch",
                "device": "cuda:0",
                "parts": [{"offsets": [start, 0], "tensor": part}],
            }
        tree = {"t": "dict", "v": [[f"layers.{t}.weight", {"t": "tensor", "name": f"layers.{t}.weight"}] for t in range(tensors)]}
        rng = per_rank_name("rng", r)
        parts.append(
            {
                "rank": r,
                "items": {
                    "model": {"tree": tree if r == 0 else None, "tensors": entries, "chunks": chunks},
                    rng: {"tree": {"t": "int", "v": str(r)}, "tensors": {}, "chunks": {}},
                },
                "files": {fname: offset},
            }
        )
    return parts


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tensors", type=int, default=200)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 8, 64, 256, 1024])
    args = p.parse_args()
    print(f"{args.tensors} sharded tensors, one row block per rank each (FSDP2 over all ranks)")
    print(f"{'ranks':>6} {'part json/rank':>15} {'merge (s)':>10} {'manifest':>12} {'parse+check (s)':>16}")
    for ranks in args.ranks:
        parts = parts_for(ranks, args.tensors)
        import json

        part_bytes = len(json.dumps(parts[-1]))
        started = time.perf_counter()
        items, files = merge(parts, "bench")  # the items are validated (blocks tile their tensors) here
        merge_s = time.perf_counter() - started
        manifest = Manifest(
            step=1,
            created="2026-11-28T00:00:00+00:00",
            metrics={"t": "dict", "v": []},
            versions={"runstate": "bench"},
            items=items,
            files=files,
            ranks=RankInfo(ranks, ("rng",)),
        )
        raw = manifest.to_json_bytes()
        started = time.perf_counter()
        Manifest.from_json_bytes(raw, "bench/manifest.json")
        parse_s = time.perf_counter() - started
        print(f"{ranks:>6} {part_bytes / 1024:>12.1f} KiB {merge_s:>10.3f} {len(raw) / 2**20:>8.1f} MiB {parse_s:>16.3f}")


if __name__ == "__main__":
    main()
