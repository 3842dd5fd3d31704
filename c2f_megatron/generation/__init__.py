"""Generation from a Megatron GPT model on any layout: KV-cached decoding of left-padded batches
(``rollout.generate``, taking the model's ``RoleLayout``) and token sampling (``sampling``). The PPO actor's
rollouts and every evaluation's generations run here.
"""
