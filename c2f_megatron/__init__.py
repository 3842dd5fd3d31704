"""c2f-megatron: the Mistral-C2F recipe (reward model, Coarse Actor PPO with Continuous Maximization,
Knowledge Residue Merger) on Megatron-Core with tensor and pipeline parallelism."""

__version__ = "0.1.0"
