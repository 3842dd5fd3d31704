"""A real pretrained model: SmolLM2-135M-Instruct (Llama, tied embeddings, 9 heads / 3 KV groups), from the
packaged Q4_1 GGUF dequantized to fp32, through the converters, four parallel layouts, the KV-cached
rollout and both evaluation backends, on real HH-RLHF prompts rendered by the model's own chat template.

Reference: transformers' ``LlamaForCausalLM`` with sdpa attention on the same HF directory (the megatron
sdpa spec computes the same ops: at TP1 the logits are equal bit for bit).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from c2f_megatron.data import (
    ChatFormat,
    HHDataConfig,
    encode_prompts,
    load_from_config,
    load_tokenizer,
    prompts_for_rl,
)
from tests.launch import run_python, run_torchrun
from tests.test_convert import TO_HF, TO_MEGATRON, _verified_diff, assert_bitwise_equal

WORKER = "smollm2_checks.py"
# fp32 logits, absolute, over 30 layers with logits up to ~30 in size: the summation order of the CPU's
# kernels sets the last bits (1.011e-4 measured on an AVX2-only AMD EPYC, below 1e-4 on the earlier machines)
TOLERANCE = 2e-4
VERIFY = ["--verify", "--verify-seq-len", "24", "--verify-tolerance", str(TOLERANCE)]
NEAR_TIE = 1e-4  # a greedy divergence may only start where HF's top-2 logit gap is below this


@pytest.fixture(scope="module")
def smol_mg(smollm2_hf: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smol_mg") / "mg"
    stdout = run_python(TO_MEGATRON, ["--hf-dir", str(smollm2_hf), "--out", str(out), *VERIFY])
    assert _verified_diff(stdout) <= TOLERANCE
    return out


@pytest.fixture(scope="module")
def hh_prompts(smollm2_hf: Path, shared_data: Path) -> list[list[int]]:
    """16 held-out HH-RLHF prompts in SmolLM2's ChatML template (its default system turn), <= 96 ids."""
    tok = load_tokenizer(str(smollm2_hf))
    chat = ChatFormat("chat-template", tok)
    source = str(shared_data / "hh-rlhf/harmless-base/test.jsonl.gz")
    data = load_from_config(HHDataConfig(source=source, split=None, eval_fraction=0.1))
    prompts = encode_prompts(chat, prompts_for_rl(data.eval, chat), [tok.eos_id], 96, "drop")
    assert len(prompts) >= 16
    return [ids for _, ids in prompts[:16]]


def _hf_model(hf_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="sdpa")


def test_round_trip_is_bitwise(smollm2_hf: Path, smol_mg: Path, tmp_path: Path):
    meta = json.loads((smol_mg / "c2f_checkpoint.json").read_text())
    model = meta["model"]
    assert (model["family"], model["untie_embeddings_and_output_weights"], model["rotary_base"]) == (
        "llama",
        False,
        100000.0,
    )
    assert (model["num_attention_heads"], model["num_query_groups"], model["vocab_size"]) == (9, 3, 49152)
    assert meta["tokenizer"]["eos_id"] == 2 and meta["tokenizer"]["pad_id"] == 0  # <|im_end|>; pad apart
    back = tmp_path / "hf"
    run_python(TO_HF, ["--megatron-dir", str(smol_mg), "--out", str(back)])
    assert_bitwise_equal(smollm2_hf, back)
    config = json.loads((back / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert (back / "tokenizer.json").is_file() and (back / "chat_template.jinja").is_file()


def test_logits_match_hf_at_tp1_tp3_pp2_pp3(smollm2_hf: Path, smol_mg: Path, hh_prompts, tmp_path: Path):
    rows = hh_prompts[:4]
    lengths = torch.tensor([len(r) for r in rows])
    tokens = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    with torch.no_grad():
        logits = _hf_model(smollm2_hf).eval()(tokens).logits.float()
    ref = tmp_path / "ref.pt"
    torch.save({"tokens": tokens, "lengths": lengths, "logits": logits}, ref)
    out = run_torchrun(WORKER, 3, ["layouts", str(smol_mg), str(ref), "tp3", "pp3"], timeout=900)
    out += run_torchrun(WORKER, 2, ["layouts", str(smol_mg), str(ref), "pp2", "tp1"], timeout=900)
    diffs = {m[0]: float(m[1]) for m in re.findall(r"LAYOUT (\w+) \S+ \S+ max_abs_diff (\S+)", out)}
    print("max |logit diff| vs HF:", diffs)
    assert sorted(diffs) == ["pp2", "pp3", "tp1", "tp3"], out
    assert all(d <= TOLERANCE for d in diffs.values()), diffs


def _mc_items(shared_data: Path):
    from c2f_megatron.eval.benchmarks import arc_items, mmlu_items, winogrande_items

    return (
        arc_items(shared_data, "local", "easy", 8, 0)
        + arc_items(shared_data, "local", "challenge", 8, 0)
        + winogrande_items(shared_data, "local", 8, 0)
        + mmlu_items(shared_data, "local", None, 8, 0)
    )


def test_greedy_generation_and_benchmark_choices_match_hf(
    smollm2_hf: Path, smol_mg: Path, hh_prompts, shared_data: Path, tmp_path: Path
):
    """64 greedy tokens (EOS suppressed, as the coarse actor samples) from the Megatron rollout equal HF
    ``generate`` on 16 prompts, except from a near-tie on; every benchmark item whose HF log-likelihood
    margin exceeds 1e-4 gets the same choice from the Megatron backend as from the HF backend."""
    from c2f_megatron.eval.hf_model import HFLanguageModel

    items = _mc_items(shared_data)
    requests = [(c, x) for it in items for c, x in zip(it.contexts, it.continuations)]
    (tmp_path / "prompts.json").write_text(json.dumps(hh_prompts))
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    run_python(
        WORKER,
        [
            "generate",
            str(smol_mg),
            str(smollm2_hf),
            *(str(tmp_path / n) for n in ("prompts.json", "requests.json", "out.json")),
        ],
        timeout=900,
    )
    ours = json.loads((tmp_path / "out.json").read_text())

    tok = load_tokenizer(str(smollm2_hf))
    lm = HFLanguageModel(smollm2_hf, tok, batch_size=8)
    width = max(map(len, hh_prompts))
    ids = torch.full((len(hh_prompts), width), tok.pad_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(hh_prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    with torch.no_grad():
        hf = lm.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=64,
            do_sample=False,
            suppress_tokens=[tok.eos_id],
            pad_token_id=tok.pad_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
    theirs = hf.sequences[:, width:].tolist()
    gaps = []
    for i, (a, b) in enumerate(zip(ours["responses"], theirs)):
        assert len(a) == 64 and tok.eos_id not in a
        if a == b:
            continue
        t = next(k for k in range(64) if a[k] != b[k])
        top2 = hf.scores[t][i].float().topk(2).values
        gaps.append((i, t, float(top2[0] - top2[1])))
    print(
        f"greedy: {16 - len(gaps)}/16 prompts identical for 64 tokens; divergences (row, step, gap): {gaps}"
    )
    assert all(gap < NEAR_TIE for _, _, gap in gaps), gaps

    hf_ll = lm.loglikelihood(requests)
    pos, same, decided, ours_correct, hf_correct = 0, 0, 0, 0, 0
    for it in items:
        k = len(it.continuations)
        mine, ref = ours["loglikelihood"][pos : pos + k], hf_ll[pos : pos + k]
        pos += k
        order = sorted(range(k), key=lambda j: -ref[j])
        pick_ours = max(range(k), key=lambda j: (mine[j], -j))
        pick_hf = max(range(k), key=lambda j: (ref[j], -j))
        ours_correct += pick_ours == it.gold
        hf_correct += pick_hf == it.gold
        if ref[order[0]] - ref[order[1]] > 1e-4:
            decided += 1
            same += pick_ours == pick_hf
    diff = max(abs(a - b) for a, b in zip(ours["loglikelihood"], hf_ll))
    print(
        f"benchmark items: {len(items)}, decided by a margin > 1e-4: {decided}, same choice: {same}; "
        f"accuracy megatron {ours_correct}/{len(items)}, HF {hf_correct}/{len(items)}; max |ll diff| {diff:.2e}"
    )
    assert same == decided and decided >= len(items) - 2
