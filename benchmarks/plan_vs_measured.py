"""``c2f plan``'s predicted peak for one PPO iteration against ``torch.cuda.max_memory_allocated``.

Plans a ``c2f coarse-actor`` config on one GPU (``c2f plan --gpus 1 --json``, a subprocess: the plan
builds on the meta device over a fake process group), then runs one iteration of the same config in this
process and prints both figures, per phase predicted and the measured peak, with the ratio measured /
predicted. On CPU it runs the iteration and prints the prediction only (no allocator statistics).

    python benchmarks/plan_vs_measured.py examples/coarse_actor_cpu.yaml model.preset=mistral-1b ...
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    config, overrides = sys.argv[1], sys.argv[2:]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        cmd = [
            sys.executable,
            "-m",
            "c2f_megatron.cli",
            "plan",
            config,
            *overrides,
            "--gpus",
            "1",
            "--json",
            str(out),
        ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        (plan,) = json.loads(out.read_text())
    from c2f_megatron.rl.cli import main as coarse_actor

    rc = coarse_actor(config, [*overrides, "ppo.iterations=1", "checkpoint.dir=null"])
    if rc:
        raise SystemExit(f"the PPO iteration failed (exit {rc})")
    gib = 1024**3
    for phase in plan["phases"]:
        print(f"planned {phase['name']:8s} {phase['total'] / gib:8.2f} GiB")
    predicted = max(p["total"] for p in plan["phases"])
    if torch.cuda.is_available():
        measured = torch.cuda.max_memory_allocated()
        print(
            f"measured peak (max_memory_allocated) {measured / gib:.2f} GiB; planned peak {predicted / gib:.2f} GiB; "
            f"measured / planned {measured / predicted:.3f}"
        )
    else:
        print(f"planned peak {predicted / gib:.3f} GiB; measured: n/a on CPU (no allocator statistics)")


if __name__ == "__main__":
    main()
