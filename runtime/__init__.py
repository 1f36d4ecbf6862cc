"""The DeepSeek-V4 inference runtime: model, hybrid KV cache, engine and OpenAI-compatible server."""
