"""Shared Megatron training loop, checkpoints and logging; the LM, SFT and reward-model trainers."""
