"""Benchmark the converters on a random ~1B Mistral-shaped checkpoint: wall time, peak RSS, I/O floor.

    python benchmarks/convert.py [--workdir /tmp] [--preset mistral-1b] [--dtype bf16] [--before REV] [--keep]

Builds a random HF checkpoint (sharded safetensors, written tensor by tensor), then times, each in a fresh
process: the bare start-up (the converter's imports), the I/O floor (read every input tensor, then write
the same bytes as safetensors), HF -> megatron and megatron -> HF. ``--before REV`` runs the converters
of another commit (a git worktree of REV) in the same run, each direction on its own output, and prints
the speed-up against it. Peak RSS is each process's own high-water mark (``VmHWM``), printed with what
the streaming design promises: at most three layers plus the embedding above the start-up's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]

FLOOR = """
import os, sys, time
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
for i, f in enumerate(sorted(src.glob("*.safetensors"))):
    with safe_open(str(f), framework="pt") as g:
        tensors = {k: g.get_tensor(k) for k in g.keys()}
    save_file(tensors, str(dst / f"copy-{i}.safetensors"))
    del tensors
    if len(sys.argv) > 3:  # durable, as the converters write: fsync each output
        fd = os.open(dst / f"copy-{i}.safetensors", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
"""

STARTUP = "import c2f_megatron.checkpoint.convert_cli, c2f_megatron.checkpoint.convert"
# What the converters before the streaming ones imported (they built the model with megatron).
STARTUP_BEFORE = "import megatron.core, c2f_megatron.checkpoint.convert, c2f_megatron.models.gpt"
# Runs a script as __main__ and prints its peak RSS (VmHWM: this process image only, unlike ru_maxrss).
HWM = (
    "import runpy, sys\n"
    "sys.argv = sys.argv[1:]\n"
    "try:\n"
    "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "finally:\n"
    "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
    "    print('C2F_HWM', int(hwm.split()[1]) * 1024)\n"
)


def write_random_hf(directory: Path, preset: str, dtype: str, shard_bytes: int = 2 * 10**9) -> int:
    """A random HF Mistral checkpoint written shard by shard (never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file

    from c2f_megatron.checkpoint.hf_mapping import expected_hf_shapes, hf_config_from_model
    from c2f_megatron.models.config import DTYPES, get_preset

    cfg = get_preset(preset, params_dtype=dtype)
    directory.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    shard: dict[str, Any] = {}
    parts: list[tuple[str, list[str]]] = []
    size = total = 0

    def flush() -> None:
        name = f"part-{len(parts)}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        parts.append((name, list(shard)))
        shard.clear()

    for name, shape in expected_hf_shapes(cfg).items():
        t = (torch.randn(shape, generator=gen) * 0.02).to(DTYPES[dtype])
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
            size = 0
        shard[name] = t
        size += nbytes
        total += nbytes
    flush()
    weight_map = {}
    for i, (part, names) in enumerate(parts, start=1):
        file_name = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        (directory / part).rename(directory / file_name)
        weight_map.update({k: file_name for k in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(hf_config_from_model(cfg, dtype)))
    return total


def measure(script: Path, args: list[str], pythonpath: Path | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS GB) of one run of ``script`` in a fresh process."""
    env = {**os.environ, "C2F_DEVICE": "cpu", "PYTHONWARNINGS": "ignore"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    start = time.perf_counter()
    # cwd: the script's folder, never the repository (``python -c`` puts the cwd first on sys.path, which
    # would shadow ``pythonpath``'s package with this checkout's)
    proc = subprocess.run(
        [sys.executable, "-c", HWM, str(script), *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=script.parent,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    hwm = [line for line in proc.stdout.splitlines() if line.startswith("C2F_HWM ")][-1]
    return wall, int(hwm.split()[1]) / 1e9


def layer_and_embedding_bytes(preset: str, dtype: str) -> tuple[int, int]:
    from c2f_megatron.checkpoint.hf_mapping import expected_hf_shapes
    from c2f_megatron.models.config import get_preset

    cfg = get_preset(preset, params_dtype=dtype)
    size = 4 if dtype == "fp32" else 2
    numel = lambda shape: math.prod(shape)  # noqa: E731
    shapes = expected_hf_shapes(cfg)
    layer = sum(numel(s) for n, s in shapes.items() if n.startswith("model.layers.0."))
    return layer * size, numel(shapes["model.embed_tokens.weight"]) * size


def run_set(root: Path, label: str, repo: Path, hf: Path, startup: str, pythonpath: Path | None):
    """Start-up and both directions of one implementation; the megatron->HF run reads its own output."""
    mg, back = root / f"mg-{label}", root / f"hf-{label}"
    script = root / f"startup-{label}.py"
    script.write_text(startup + "\n")
    rows = [
        (f"start-up ({label})", measure(script, [], pythonpath)),
        (
            f"HF -> megatron ({label})",
            measure(
                repo / "tools/convert_hf_to_megatron.py", ["--hf-dir", str(hf), "--out", str(mg)], pythonpath
            ),
        ),
        (
            f"megatron -> HF ({label})",
            measure(
                repo / "tools/convert_megatron_to_hf.py",
                ["--megatron-dir", str(mg), "--out", str(back)],
                pythonpath,
            ),
        ),
    ]
    shutil.rmtree(mg, ignore_errors=True)
    shutil.rmtree(back, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--workdir", default="/tmp", help="where the temporary checkpoints go (~4x model size)"
    )
    parser.add_argument("--preset", default="mistral-1b")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--before", default=None, help="also run the converters of this git revision")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="c2f-convert-bench-", dir=args.workdir))
    worktree = root / "before"
    try:
        hf, floor = root / "hf", root / "floor"
        t = time.perf_counter()
        nbytes = write_random_hf(hf, args.preset, args.dtype)
        print(
            f"random {args.preset} ({args.dtype}): {nbytes / 1e9:.2f} GB in {time.perf_counter() - t:.1f} s"
        )
        floor_script = root / "floor.py"
        floor_script.write_text(FLOOR)
        floor_s, floor_rss = measure(floor_script, [str(hf), str(floor)])
        shutil.rmtree(floor)
        synced_s, _ = measure(floor_script, [str(hf), str(floor), "fsync"])
        shutil.rmtree(floor)
        sets = {"now": run_set(root, "now", REPO, hf, STARTUP, None)}
        if args.before:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.before],
                check=True,
                capture_output=True,
            )
            sets["before"] = run_set(root, "before", worktree, hf, STARTUP_BEFORE, worktree)
        layer, emb = layer_and_embedding_bytes(args.preset, args.dtype)
        print(
            f"\nmodel bytes: {nbytes / 1e9:.2f} GB   largest layer: {layer / 1e9:.3f} GB   embedding: "
            f"{emb / 1e9:.3f} GB   cpus: {psutil.cpu_count()}"
        )
        print(
            f"I/O floor (read all inputs, write the same bytes): {floor_s:.2f} s, peak RSS {floor_rss:.2f} GB"
        )
        print(
            f"  for context, the floor with an fsync of each output (the converters fsync theirs): "
            f"{synced_s:.2f} s; the ratios below are against the floor without"
        )
        print(
            f"{'step':26s} {'wall s':>7s} {'x floor':>8s} {'x floor excl. start-up':>23s} {'peak RSS GB':>12s} "
            f"{'above start-up GB':>18s} {'in layers':>10s}"
        )
        for rows in sets.values():
            startup_s, startup_rss = rows[0][1]
            for name, (wall, rss) in rows:
                if name.startswith("start-up"):
                    print(f"{name:26s} {wall:7.2f} {'':>8s} {'':>23s} {rss:12.2f}")
                    continue
                above = rss - startup_rss
                print(
                    f"{name:26s} {wall:7.2f} {wall / floor_s:8.2f} {(wall - startup_s) / floor_s:23.2f} "
                    f"{rss:12.2f} {above:18.2f} {above * 1e9 / layer:10.2f}"
                )
        budget = (3 * layer + emb) / 1e9
        print(f"memory budget above start-up (3 layers + embedding): {budget:.2f} GB")
        if "before" in sets:
            for i, direction in ((1, "HF -> megatron"), (2, "megatron -> HF")):
                now, before = sets["now"][i][1], sets["before"][i][1]
                print(
                    f"{direction}: {before[0] / now[0]:.2f}x faster than {args.before} "
                    f"({before[0]:.1f} s -> {now[0]:.1f} s), peak RSS {before[1]:.2f} -> {now[1]:.2f} GB"
                )
    finally:
        if worktree.exists():
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=False
            )
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")


if __name__ == "__main__":
    main()
