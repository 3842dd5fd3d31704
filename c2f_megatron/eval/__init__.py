"""Evaluation: benchmark scorers, answer extraction, response metrics, MT-Bench judging and run reports.

Everything here talks to a model only through ``protocol.LanguageModel`` so that scorers can be checked with
scripted test doubles and reused for any backend: ``megatron_model`` (a c2f checkpoint on any TP/PP) and
``hf_model`` (transformers, the reference), sharing ``lm``'s request splitting, batching and stop handling.
``benchmarks/`` holds the benchmarks, ``mt_bench`` and ``judge_client`` the judged evaluation, ``cli`` the
``c2f eval`` command.
"""
