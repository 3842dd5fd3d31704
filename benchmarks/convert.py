"""Benchmark the converters on a random ~1B Mistral-shaped checkpoint: wall time, peak RSS, I/O floor.

    python benchmarks/convert.py [--workdir /tmp] [--preset mistral-1b] [--dtype bf16] [--keep]

Builds a random HF checkpoint (sharded safetensors, written tensor by tensor), then times, each in a fresh
process: HF -> megatron, megatron -> HF, the I/O floor (read every input tensor and write the same bytes
as safetensors) and the bare start-up (imports). Peak RSS is polled with psutil over the process tree
(main process alone, and the tree sum, which counts shared pages twice).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]

FLOOR = """
import sys, time
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
"""

STARTUP = "import megatron.core, c2f_megatron.checkpoint.convert, c2f_megatron.models.gpt"


def write_random_hf(directory: Path, preset: str, dtype: str, shard_bytes: int = 2 * 10**9) -> int:
    """A random HF Mistral checkpoint written shard by shard (never the whole model in memory)."""
    from safetensors.torch import save_file

    from c2f_megatron.checkpoint.hf_mapping import expected_hf_shapes, hf_config_from_model
    from c2f_megatron.models.config import DTYPES, get_preset

    cfg = get_preset(preset, params_dtype=dtype)
    directory.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
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


def measure(cmd: list[str]) -> tuple[float, float, float]:
    """(wall seconds, peak main-process RSS GB, peak process-tree RSS GB) of a command."""
    env = {**__import__("os").environ, "C2F_DEVICE": "cpu", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    peak_main = peak_tree = 0
    while proc.poll() is None:
        try:
            main = root.memory_info().rss
            tree = main + sum(c.memory_info().rss for c in root.children(recursive=True))
        except psutil.Error:
            continue
        peak_main, peak_tree = max(peak_main, main), max(peak_tree, tree)
        time.sleep(0.05)
    wall = time.perf_counter() - start
    output = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-4000:]}")
    return wall, peak_main / 1e9, peak_tree / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--workdir", default="/tmp", help="where the temporary checkpoints go (~4x model size)"
    )
    parser.add_argument("--preset", default="mistral-1b")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="c2f-convert-bench-", dir=args.workdir))
    try:
        hf, mg, back, floor = root / "hf", root / "mg", root / "hf_back", root / "floor"
        t = time.perf_counter()
        nbytes = write_random_hf(hf, args.preset, args.dtype)
        print(
            f"random {args.preset} ({args.dtype}): {nbytes / 1e9:.2f} GB in {time.perf_counter() - t:.1f} s"
        )
        py = sys.executable
        rows = [
            ("start-up (imports)", measure([py, "-c", STARTUP])),
            ("I/O floor (read+write)", measure([py, "-c", FLOOR, str(hf), str(floor)])),
            (
                "HF -> megatron",
                measure(
                    [py, str(REPO / "tools/convert_hf_to_megatron.py"), "--hf-dir", str(hf), "--out", str(mg)]
                ),
            ),
            (
                "megatron -> HF",
                measure(
                    [
                        py,
                        str(REPO / "tools/convert_megatron_to_hf.py"),
                        "--megatron-dir",
                        str(mg),
                        "--out",
                        str(back),
                    ]
                ),
            ),
        ]
        floor_s, startup_s = rows[1][1][0], rows[0][1][0]
        print(
            f"\nmodel bytes: {nbytes / 1e9:.2f} GB   threads: {torch.get_num_threads()}   cpus: {psutil.cpu_count()}"
        )
        print(
            f"{'step':26s} {'wall s':>8s} {'peak RSS GB':>12s} {'tree RSS GB':>12s} {'x floor':>8s} "
            f"{'x floor (excl. start-up)':>25s}"
        )
        for name, (wall, main_rss, tree_rss) in rows:
            net = (wall - startup_s) / floor_s if "->" in name else float("nan")
            print(
                f"{name:26s} {wall:8.1f} {main_rss:12.2f} {tree_rss:12.2f} {wall / floor_s:8.2f} {net:25.2f}"
            )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")


if __name__ == "__main__":
    main()
