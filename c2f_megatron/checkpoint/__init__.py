"""Checkpoint formats: the c2f megatron checkpoint directory, HF <-> megatron mapping.

Kept import-light (no torch): the merge tool detects a c2f checkpoint by its metadata file without torch.
"""

# The file that marks a complete c2f checkpoint directory (``megatron_dir.CheckpointMetadata``).
METADATA_FILE = "c2f_checkpoint.json"
