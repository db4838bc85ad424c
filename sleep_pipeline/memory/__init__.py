"""Short-term memory: the retrieval index over high-churn knowledge (sleep_pipeline.memory.index)."""
