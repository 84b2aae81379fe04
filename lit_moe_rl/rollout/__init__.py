"""Generation: the rollout-engine interface and the Hugging Face engine (:mod:`.engine`), its decode loop,
sampling with the engine's own log-probs μ, its weight copy in Hugging Face dtypes, prompt rendering, and
per-prompt seeding (W ranks sample what one process does)."""
