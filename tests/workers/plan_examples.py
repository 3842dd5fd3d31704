"""Plan every example config in this one process (meta-device builds of every role at its TP/PP) and
write what the tests check: parameter counts, sharded-state-dict keys and shapes, the modules chosen."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from c2f_megatron.plan.jobs import plan_jobs
from c2f_megatron.plan.report import role_memory


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("configs", nargs="+")
    args = p.parse_args()
    t0 = time.perf_counter()
    out = []
    for path in args.configs:
        for job in plan_jobs(path, [], None):
            for role in job.roles:
                mem = role_memory(role, job.rollout)
                out.append(
                    {
                        "config": Path(path).name,
                        "job": job.title,
                        "role": role.name,
                        "kind": role.kind,
                        "tp": role.tp,
                        "pp": role.pp,
                        "spec": mem.spec,
                        "model": role.model.to_dict(),
                        "padded_vocab": role.model.padded_vocab_size(role.tp),
                        "total_params": mem.shards.total_params(role.model.vocab_size),
                        "keys": {k: list(v) for k, v in mem.shards.keys().items()},
                        "layers": [r.layers for r in mem.shards.ranks],
                        "modules": [r.spec_modules for r in mem.shards.ranks],
                    }
                )
    Path(args.out).write_text(json.dumps({"seconds": time.perf_counter() - t0, "roles": out}))


if __name__ == "__main__":
    main()
