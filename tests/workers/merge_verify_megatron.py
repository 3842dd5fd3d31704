"""Load merge outputs (world of 1) and check them bitwise against the recipe applied to the loaded inputs.

``--check OUT:KIND:GAMMA`` (KIND 'linear': gamma*a + (1-gamma)*b, or 'task': b + gamma*(a - base)): every
tensor of OUT equals the recipe applied to the loaded inputs in fp32, rounded once to OUT's stored dtype.
"""

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--a", type=Path, required=True)
    parser.add_argument("--b", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--check", action="append", required=True)
    args = parser.parse_args()

    from c2f_megatron.checkpoint.megatron_dir import load_model_checkpoint, read_metadata
    from c2f_megatron.merge.math import evaluate
    from c2f_megatron.merge.recipe import MergeRecipe
    from c2f_megatron.models.gpt import build_gpt_model
    from c2f_megatron.platform.distributed import ParallelConfig, init_distributed

    init_distributed(ParallelConfig())
    meta = read_metadata(args.a)

    def load(path: Path, dtype: str) -> dict[str, torch.Tensor]:
        cfg = meta.model.__class__(**{**meta.model.to_dict(), "params_dtype": dtype})
        model = build_gpt_model(cfg, perform_initialization=False)
        load_model_checkpoint([model], path)
        return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}

    inputs = {name: load(getattr(args, name), "fp32") for name in ("a", "b", "base")}
    for item in args.check:
        out, kind, gamma_text = item.split(":")
        gamma = float(gamma_text)
        recipe = (
            MergeRecipe("task", (gamma,)) if kind == "task" else MergeRecipe("weighted", (gamma, 1.0 - gamma))
        )
        out_meta = read_metadata(out)
        got = load(Path(out), out_meta.dtype)
        names = ("a", "b", "base") if kind == "task" else ("a", "b")
        for key, value in got.items():
            expected = evaluate(recipe, [inputs[n][key] for n in names]).to(value.dtype)
            if not torch.equal(value, expected):
                diff = (value.float() - expected.float()).abs().max().item()
                raise SystemExit(f"{out}: tensor {key} differs from the direct formula (max abs diff {diff})")
        record = out_meta.provenance["merge"]
        assert record["weights"] == list(recipe.weights), record
        print(f"OK {out} {len(got)} tensors dtype={out_meta.dtype} {json.dumps(record['layout'])}")


if __name__ == "__main__":
    main()
