"""``c2f serve`` throughput: requests/s and tokens/s at 1, 4 and 16 concurrent clients.

Starts ``c2f serve`` on SmolLM2-135M-Instruct (the packaged GGUF, converted to an fp32 HF directory, then by
the server to a c2f checkpoint) or on ``--checkpoint``, and sends the same ``--requests`` chat requests
(held-out HH-RLHF prompts from ``../shared/data``, greedy, ``--max-tokens`` each) from 1, 4 and 16 client
threads through the ``openai`` client. The reference is the same server with one client, requests one
after another: the ratio says what batching concurrent requests buys.

    python benchmarks/serve.py [--checkpoint DIR] [--clients 1 4 16] [--requests 16] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path


def hh_questions(data: Path, n: int) -> list[str]:
    from c2f_megatron.data import HHDataConfig, load_from_config, parse_hh

    cfg = HHDataConfig(
        source=str(data / "hh-rlhf/harmless-base/test.jsonl.gz"), split=None, eval_fraction=0.1
    )
    out: list[str] = []
    for pair in load_from_config(cfg).eval:
        first = parse_hh(pair.prompt)[0][1]
        if first not in out:
            out.append(first)
        if len(out) == n:
            return out
    raise SystemExit(f"{data}: fewer than {n} held-out HH prompts")


def run_level(client, model: str, questions: list[str], clients: int, max_tokens: int) -> dict[str, float]:
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    todo = list(range(len(questions)))

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            start = time.perf_counter()
            r = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": questions[i]}],
                temperature=0,
                max_tokens=max_tokens,
            )
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens[0] += r.usage.completion_tokens

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {
        "requests_per_s": len(questions) / wall,
        "tokens_per_s": tokens[0] / wall,
        "latency_mean_s": statistics.mean(latencies),
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="c2f checkpoint or HF directory (default: SmolLM2-135M fp32)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = parser.parse_args()

    import openai

    from c2f_megatron.serve.process import ServerProcess

    questions = hh_questions(Path(args.data), args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint
        if ckpt is None:
            from c2f_megatron.checkpoint.gguf import convert_gguf_to_hf, smollm2_gguf_path

            ckpt = str(Path(tmp) / "SmolLM2-135M-Instruct")
            convert_gguf_to_hf(smollm2_gguf_path(), ckpt)
        with ServerProcess(
            ["--checkpoint", ckpt, "--work-dir", tmp, "--model-name", "bench", "--quiet"]
        ) as server:
            client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=600)
            run_level(client, "bench", questions[:2], 2, 4)  # warm-up
            rows = {n: run_level(client, "bench", questions, n, args.max_tokens) for n in args.clients}
    base = rows[args.clients[0]]
    print(
        f"c2f serve, {args.requests} chat requests (held-out HH prompts, greedy, max_tokens {args.max_tokens}), "
        f"reference: {args.clients[0]} client(s)"
    )
    print(f"{'clients':>8} {'requests/s':>11} {'tokens/s':>9} {'latency s':>10} {'wall s':>7} {'ratio':>6}")
    for n, r in rows.items():
        print(
            f"{n:>8} {r['requests_per_s']:>11.2f} {r['tokens_per_s']:>9.1f} {r['latency_mean_s']:>10.2f} "
            f"{r['wall_s']:>7.1f} {r['tokens_per_s'] / base['tokens_per_s']:>5.2f}x"
        )


if __name__ == "__main__":
    main()
