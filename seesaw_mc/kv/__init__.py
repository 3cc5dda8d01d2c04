"""KV cache: pure-Python block accounting (block_manager) and device tensors (paged_cache)."""
