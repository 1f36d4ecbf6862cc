"""The paged multi-pool hybrid KV cache: layout (`spec`), the pure-Python allocator (`manager`)."""
