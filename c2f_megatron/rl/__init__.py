"""RLHF for the Coarse Actor: PPO math (``core_algos``), KL coefficient control (``kl_control``) and the
Continuous Maximization rollout-length controller (``length_control``), KV-cached generation from the
Megatron actor (``rollout``, sampling functions in ``sampling``); the trainer only orchestrates them."""
