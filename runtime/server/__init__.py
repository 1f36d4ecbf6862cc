"""OpenAI-compatible HTTP server over the engine: protocol models, the FastAPI app, metrics, `dsv4 serve`."""
