"""Training: the one run loop every trainer uses (``run_loop``), training checkpoints and resume
(``checkpointing``), logging (the compact console line, metrics.jsonl, wandb) and preemption, the
end-of-job summary and PPO curves (``summary``), the typed sections of a trainer's config (``config``), the
supervised trainer (``trainer``) and its LM/SFT/RM tasks (``tasks/``). Models, optimizers and schedules are
``c2f_megatron.engine``'s."""
