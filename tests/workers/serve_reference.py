"""Our own generation for the serve tests: ``MegatronLM.generate_ids`` on each prompt alone (batch 1).

argv: CHECKPOINT TOKENIZER_SPEC_OR_- REQUESTS_JSON. The JSON holds ``{"prompts": [[ids...], ...],
"max_new_tokens": N, "stop": [...]}``; prints ``REFERENCE <json list of response ids>``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from c2f_megatron.data import load_tokenizer
from c2f_megatron.eval.megatron_model import MegatronLM
from c2f_megatron.platform.distributed import ParallelConfig, init_distributed


def main(ckpt: str, spec: str, requests: str) -> None:
    init_distributed(ParallelConfig())
    doc = json.loads(Path(requests).read_text())
    tokenizer = load_tokenizer(None if spec == "-" else spec)
    lm = MegatronLM.from_checkpoint(Path(ckpt), tokenizer, batch_size=1)
    out = lm.generate_ids(doc["prompts"], doc["max_new_tokens"], stop=doc.get("stop", []))
    print("REFERENCE " + json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:4])
