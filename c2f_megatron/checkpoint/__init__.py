"""Checkpoint formats: the c2f megatron checkpoint directory, HF <-> megatron mapping."""
