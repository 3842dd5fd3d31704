"""SFT loss covers response tokens + EOS only: ``token_loss`` on a collated HH batch vs a direct computation."""

import json
import sys

import torch
import torch.nn.functional as F

from c2f_megatron.data import ChatFormat, load_hh_rlhf, load_tokenizer
from c2f_megatron.platform.distributed import ParallelConfig, init_distributed
from c2f_megatron.training.tasks.lm import token_loss
from c2f_megatron.training.tasks.sft import collate_sft, tokenize_pairs

SEQ = 96


def main(source: str) -> None:
    init_distributed(ParallelConfig())
    tok = load_tokenizer()
    fits = [
        p
        for p in load_hh_rlhf(source, max_pairs=200).pairs
        if sum(map(len, tok.encode_pair(p.prompt, p.chosen))) + 2 <= SEQ + 1
    ]
    pairs = fits[:4]
    examples = tokenize_pairs(pairs, ChatFormat("hh", tok), SEQ)
    batch = collate_sft(examples, SEQ, tok.pad_id, torch.device("cpu"))
    padded_vocab = 32000 + 128  # pretend TP padding: these columns must not matter
    logits = torch.randn(len(examples), SEQ, padded_vocab, generator=torch.Generator().manual_seed(0))
    loss_sum, n, _ = token_loss(batch["labels"], batch["loss_mask"], tok.vocab_size, logits.clone())
    direct, count, checks = 0.0, 0, []
    for row, pair in enumerate(pairs):
        prompt_ids, response_ids = tok.encode_pair(pair.prompt, pair.chosen)
        full = [tok.bos_id, *prompt_ids, *response_ids, tok.eos_id]
        first = 1 + len(prompt_ids)  # index in `full` of the first response id
        for t in range(first - 1, len(full) - 1):  # position t predicts full[t + 1]
            direct += F.cross_entropy(logits[row, t, : tok.vocab_size], torch.tensor(full[t + 1])).item()
            count += 1
        mask = batch["loss_mask"][row]
        checks.append(
            {
                "prompt_masked": float(mask[: first - 1].sum()) == 0.0,
                "response_len": int(mask.sum()) == len(response_ids) + 1,
                "last_label_is_eos": int(batch["labels"][row, len(full) - 2]) == tok.eos_id
                and float(mask[len(full) - 2]) == 1.0,
                "padding_masked": float(mask[len(full) - 1 :].sum()) == 0.0,
            }
        )
    rows_checked = len(checks)
    print(
        "RESULT "
        + json.dumps(
            {
                "loss_sum": float(loss_sum),
                "n": int(n),
                "direct": direct,
                "count": count,
                "rows_checked": rows_checked,
                "checks": checks,
                "all_rows": rows_checked == len(pairs) == 4,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
