"""A ``LanguageModel`` over a Hugging Face directory through transformers: the reference backend.

``c2f eval ... backend=hf`` scores and generates with ``AutoModelForCausalLM`` instead of the Megatron
model, with the same requests, batching and stop handling (``eval.lm.TokenLM``), so a converted checkpoint
can be checked item by item against the model it came from. Greedy generation uses ``generate`` with a
left-padded batch and the tokenizer's EOS; a row also ends at a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from c2f_megatron.data.tokenizer import Tokenizer
from c2f_megatron.eval.lm import GREEDY, Sampling, StopStrings, TokenLM, batches


class HFLanguageModel(TokenLM):
    def __init__(
        self,
        hf_dir: str | Path,
        tokenizer: Tokenizer,
        batch_size: int = 8,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
    ):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            str(hf_dir), dtype=dtype, attn_implementation=attn_implementation
        ).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = int(self.model.config.max_position_embeddings)

    @torch.no_grad()
    def _logprobs_at(self, tokens: Tensor, rows: Tensor, positions: Tensor, labels: Tensor) -> Tensor:
        logits = self.model(tokens).logits[..., : self.tokenizer.vocab_size]
        at = logits[rows, positions].float()
        return torch.log_softmax(at, -1).gather(-1, labels[:, None]).squeeze(-1)

    @torch.no_grad()
    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: Sampling = GREEDY,
        stop: Sequence[str] = (),
    ) -> list[list[int]]:
        from transformers import StoppingCriteria, StoppingCriteriaList

        stop_when = StopStrings(self.tokenizer, stop) if stop else None

        class _Stop(StoppingCriteria):
            def __init__(self, width: int):
                self.width = width

            def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
                rows = input_ids[:, self.width :].tolist()
                return torch.tensor([stop_when(r[-16:]) for r in rows], dtype=torch.bool)

        eos, pad = self.tokenizer.eos_id, self.tokenizer.pad_id
        out: list[list[int]] = []
        for rows in batches(len(prompts), self.batch_size):
            batch = [list(prompts[i]) for i in rows]
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, p in enumerate(batch):
                ids[j, width - len(p) :] = torch.tensor(p)
                mask[j, width - len(p) :] = 1
            filters = (
                {}
                if sampling.greedy
                else {
                    "temperature": sampling.temperature,
                    "top_k": sampling.top_k or None,
                    "top_p": sampling.top_p,
                }
            )
            generated = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=not sampling.greedy,
                eos_token_id=eos,
                pad_token_id=pad,
                stopping_criteria=StoppingCriteriaList([_Stop(width)]) if stop_when else None,
                **filters,
            )[:, width:].tolist()
            for row in generated:
                response = []
                for t in row:
                    response.append(t)
                    if t == eos:
                        break
                while response and response[-1] == pad and pad != eos:
                    response.pop()
                out.append(response)
        return out
