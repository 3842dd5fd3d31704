"""``c2f serve``: a checkpoint behind the OpenAI API (``protocol``: requests and responses, torch-free;
``engine``: a batch of rows through the rollout generator on any TP/PP layout; ``server``: HTTP, batching
of concurrent requests, streaming; ``cli``: the command)."""
