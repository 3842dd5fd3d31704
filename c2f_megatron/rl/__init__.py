"""RLHF for the Coarse Actor, verl-style: pure math apart from the models, roles as thin layers on the engine.

- ``core_algos``: GAE, policy and value losses, KL estimators, whitening (pure tensor functions);
- ``kl_control``, ``length_control``: the KL coefficient and Continuous Maximization (the rollout length);
- ``experience``: the batch between the roles (``Experience``) and how advantages are made from it;
- ``prompts``: the seeded prompt stream; ``roles``: the four ``engine.RoleModel``s of a job on their layouts;
- ``workers``: each role's math (log-probs, values, losses, rewards) over ``engine.rows``;
- ``vocab_parallel``: log-probs and entropy over a TP-sharded vocabulary;
- ``ppo_trainer``: one iteration (rollout, scoring, GAE, updates, controllers) in the shared run loop.

Generation itself is ``c2f_megatron.generation``.
"""
