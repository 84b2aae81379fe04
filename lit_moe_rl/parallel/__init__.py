"""Cross-rank code, sharding, mixed precision, the memory planner."""
