"""Continuous-batching engine: requests and sequences, the scheduler, the model runner, sampling, the engine loop."""
