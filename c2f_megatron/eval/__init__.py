"""Evaluation: benchmark scorers, answer extraction, response metrics, MT-Bench judging and run reports.

Everything here talks to a model only through ``protocol.LanguageModel`` so that scorers can be checked with
scripted test doubles and reused for any backend (Megatron checkpoints, HF models).
"""
