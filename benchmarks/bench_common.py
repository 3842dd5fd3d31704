"""What the generation benchmarks share: SmolLM2-135M-Instruct as a c2f checkpoint and as an HF model,
held-out HH-RLHF prompts in its chat template, and the same measurement run on another checkout.

``--before TREE`` in a benchmark reruns its own measurement with ``c2f_megatron`` imported from ``TREE``
(a checkout of the code before a change, e.g. ``git worktree add /tmp/before <commit>``), in a child
process on the same machine and in the same run, so the ratio "after / before" is measured side by side.
The child prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_SOURCE = "hh-rlhf/harmless-base/test.jsonl.gz"


def smollm2(work_dir: Path) -> tuple[Path, Path]:
    """(c2f checkpoint, HF directory) of the packaged SmolLM2-135M-Instruct GGUF, fp32, converted once
    under ``work_dir``."""
    from c2f_megatron.checkpoint.resolve import PACKAGED_SMOLLM2, checkpoint_or_converted

    ckpt = checkpoint_or_converted(PACKAGED_SMOLLM2, None, work_dir, 1, 1)
    hf_dirs = sorted((work_dir / "from_gguf").iterdir())
    return ckpt, hf_dirs[0]


def hh_prompt_ids(tokenizer, n: int, max_length: int = 128, data: Path = DATA) -> list[list[int]]:
    """The first ``n`` held-out HH-RLHF prompts (10% held out, seed 0, as the pipeline's eval), rendered in
    the tokenizer's chat template, at most ``max_length`` ids (longer ones left out)."""
    from c2f_megatron.data import ChatFormat, HHDataConfig, encode_prompts, load_from_config, prompts_for_rl

    cfg = HHDataConfig(source=str(data / HH_SOURCE), split=None, eval_fraction=0.1, seed=0)
    chat = ChatFormat("chat-template", tokenizer)
    texts = prompts_for_rl(load_from_config(cfg).eval, chat)
    prompts = encode_prompts(chat, texts, [tokenizer.eos_id, tokenizer.pad_id], max_length, "drop")
    if len(prompts) < n:
        raise SystemExit(f"{data / HH_SOURCE}: only {len(prompts)} held-out prompts of <= {max_length} ids")
    return [ids for _, ids in prompts[:n]]


def timed(fn, repeats: int = 1):
    """(the last result, the best wall seconds of ``repeats`` calls)."""
    import torch

    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return out, best


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def run_before(tree: str, script: str, argv: list[str], timeout: int = 3600) -> dict:
    """``script`` (this checkout's benchmark) run with ``c2f_megatron`` from ``tree``; its RESULT dict."""
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
    proc = subprocess.run(
        [sys.executable, str(Path(script).resolve()), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,  # same working directory: relative paths in configs stay valid
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"--before {tree}: the run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def check_before_tree(tree: str) -> None:
    if not (Path(tree) / "c2f_megatron" / "__init__.py").is_file():
        raise SystemExit(f"--before {tree}: not a c2f-megatron checkout (no c2f_megatron/__init__.py)")


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    """The first index where two id lists differ (a length difference counts), or None."""
    diff = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if diff is None and len(a) != len(b):
        return min(len(a), len(b))
    return diff


def source_of_c2f() -> str:
    import c2f_megatron

    return str(Path(c2f_megatron.__file__).resolve().parents[1])
