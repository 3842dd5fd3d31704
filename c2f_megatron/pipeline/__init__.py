"""``c2f pipeline CONFIG [key.path=value ...]``: the whole C2F recipe, one resumable stage at a time.

    base (a pretrained model converted, or train-lm on the HH train split) -> sft (or the base itself, an
    instruct model) -> rm -> coarse (PPO with the CM length limit) and the variants (e.g. Plus: ordinary
    PPO; the length-schedule ablation) -> merge (Fine Actor sweep over gamma; variants at their gamma)
    -> eval (one stage per table row) -> report (table, pairwise win rates, RM accuracy, stage times, plots)

- ``config``: the typed sections (``PipelineConfig``);
- ``stages``: how each stage runs and chains its outputs, markers, resume and ``reuse``;
- ``report``: everything under ``run_dir/report``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from c2f_megatron.config import ConfigError, help_kwargs, load_config, to_dict
from c2f_megatron.pipeline.config import PipelineConfig
from c2f_megatron.pipeline.report import run_summary
from c2f_megatron.pipeline.stages import MARKER, Pipeline, StageFailed

__all__ = ["MARKER", "Pipeline", "PipelineConfig", "StageFailed", "main", "register"]


def register(subparsers: Any) -> None:
    help_text = "the whole C2F recipe end to end, resumable stage by stage"
    parser = subparsers.add_parser(
        "pipeline",
        help=help_text,
        description=__doc__.split("\n\n")[0],
        **help_kwargs(PipelineConfig),
    )
    parser.add_argument("config", help="pipeline YAML (see examples/pipeline_*.yaml)")
    parser.add_argument(
        "overrides", nargs="*", help="key.path=value overrides, e.g. coarse.job.ppo.iterations=4"
    )
    parser.set_defaults(func=lambda args: main(args.config, args.overrides))


def main(config_path: str, overrides: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(PipelineConfig, config_path, overrides)
        pipeline = Pipeline(cfg, config_dump=to_dict(cfg))
        pipeline.validate()
    except (ConfigError, ValueError) as exc:
        print(f"c2f pipeline: {exc}", file=sys.stderr)
        return 2
    start = time.time()
    try:
        report = pipeline.run()
        summary = run_summary(pipeline, time.time() - start, report)
    except StageFailed as exc:
        print(f"c2f pipeline: {exc}\nrerun the same command to resume at this stage", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:  # bad input met in-process (the base corpus's data files)
        print(f"c2f pipeline: {exc}", file=sys.stderr)
        return 2
    summary.finish()
    return 0
