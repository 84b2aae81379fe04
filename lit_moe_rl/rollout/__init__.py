"""Generation: the rollout-engine interface and the Hugging Face engine (:mod:`.engine`), its decode loop,
sampling with the engine's own log-probs μ, its weight copy in Hugging Face dtypes, prompt rendering,
per-prompt seeding (W ranks sample what one process does), and multi-turn rollouts: the environment
interface (:mod:`.env`), the loop that keeps each trajectory's KV cache across turns (:mod:`.multiturn`),
observations tokenised as suffixes, environments in worker processes, generation in waves."""
