"""One module per trainer: its data, collator, megatron ``forward_step`` and loss, and its job config."""
