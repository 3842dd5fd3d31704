"""``c2f checkpoint verify PATH``: the check loads and resume run (``manifest.verify``), by hand.

PATH may be a c2f checkpoint, a training step, a training root (every complete step in it is checked,
newest first) or a Hugging Face directory. Prints one line per directory and every problem found; exits 0
when all verify, 2 otherwise. Torch-free.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from c2f_megatron.checkpoint import CheckpointError, manifest
from c2f_megatron.checkpoint.steps import STEP_DIR, list_checkpoints


def check_directory(path: Path, checksums: bool) -> list[str]:
    """Problems of one directory: its manifest, else the structural check and, for an HF directory, the
    safetensors headers against the file sizes."""
    problems = manifest.verify(path, checksums=checksums)
    if not problems and manifest.find_manifest(path) is None and (path / "config.json").is_file():
        from c2f_megatron.checkpoint.hf_dir import open_hf_checkpoint

        try:
            open_hf_checkpoint(path, CheckpointError)
        except CheckpointError as exc:
            problems.append(str(exc))
    return problems


def targets(path: Path) -> list[Path]:
    """``path`` itself, or the complete steps of a training root (newest first)."""
    if (path / manifest.MANIFEST_FILE).is_file() or STEP_DIR.match(path.name):
        return [path]
    steps = [p for _, p in reversed(list_checkpoints(path))]
    return steps or [path]


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.is_dir():
        print(f"c2f checkpoint verify: error: {path}: directory not found", file=sys.stderr)
        return 2
    bad = 0
    for target in targets(path):
        problems = check_directory(target, checksums=not args.sizes_only)
        covered = manifest.find_manifest(target)
        if problems:
            bad += 1
            print(f"{target}: FAILED ({len(problems)} problem(s))")
            for problem in problems:
                print(f"  {problem}")
        elif covered is None:
            print(
                f"{target}: no {manifest.MANIFEST_FILE} (older or foreign output); structure OK, bytes unchecked"
            )
        else:
            base, prefix = covered
            records = [r for r in manifest.read_manifest(base) if r.path.startswith(prefix)]
            what = "sizes" if args.sizes_only else "sizes and CRC-32"
            total = sum(r.size for r in records)
            print(f"{target}: OK ({len(records)} files, {total / 1e9:.3g} GB, {what} match the manifest)")
    set_aside = sorted(p.name for p in path.glob("step_*.unverified*")) if path.is_dir() else []
    if set_aside:
        print(f"set aside by resume (kept, not used): {', '.join(set_aside)}")
    return 2 if bad else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="check checkpoints against their manifests")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    v = actions.add_parser(
        "verify",
        help="verify a checkpoint, step, training root or HF directory against its manifest",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    v.add_argument("path", help="c2f checkpoint, training step, training root or HF directory")
    v.add_argument("--sizes-only", action="store_true", help="check sizes only, not the CRC-32 (fast)")
    v.set_defaults(func=run)
