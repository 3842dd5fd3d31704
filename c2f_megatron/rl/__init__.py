"""RLHF for the Coarse Actor: PPO math (``core_algos``), KL coefficient control (``kl_control``) and the
Continuous Maximization rollout-length controller (``length_control``); the trainer only orchestrates them."""
