"""Checkpoint formats and conversions: the c2f megatron checkpoint directory (``megatron_dir``) and training
step directories (``steps``), the one resolver and tokenizer check (``resolve``), the one HF safetensors
reader/writer (``hf_dir``), the HF <-> megatron mapping (``hf_mapping``), the converters (``convert``,
``verify``), GGUF import (``gguf``, ``gguf_reader``) atomic output directories (``atomic_dir``) and their
manifests (``manifest``), with the one error type, ``CheckpointError``.

Kept import-light (no torch): the merge tool detects a c2f checkpoint by its metadata file without torch.
"""


class CheckpointError(ValueError):
    """A checkpoint (or checkpoint output) that cannot be used, with the file and field named."""


# The file that marks a complete c2f checkpoint directory (``megatron_dir.CheckpointMetadata``).
METADATA_FILE = "c2f_checkpoint.json"

# The files of a Hugging Face directory that define its tokenizer and chat template: carried along by the
# converters, compared byte for byte and copied by the merge (a different vocabulary or template is a
# different model).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "tekken.json",
)
# Copied along with the weights but not compared (sampling defaults, not the model).
HF_SIDE_FILES = ("generation_config.json",)
