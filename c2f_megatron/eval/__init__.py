"""Evaluation: benchmark scorers, answer extraction, response metrics, judged evaluations and run reports.

Everything here talks to a model only through ``protocol.LanguageModel`` so that scorers can be checked with
scripted test doubles and reused for any backend: ``megatron_model`` (a c2f checkpoint on any TP/PP) and
``hf_model`` (transformers, the reference), sharing ``lm``'s request splitting, batching and stop handling.
``benchmarks/`` holds the benchmarks; ``judge_client`` (the endpoint), ``mt_bench`` (FastChat's protocol),
``rubric`` (ICE-GRT's 8 criteria) and ``judged`` (their output files as rows and charts) the judged
evaluations; ``cli`` the ``c2f eval`` command.
"""
