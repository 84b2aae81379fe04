"""lit_moe_rl: reinforcement learning with verifiable rewards for Mixture-of-Experts language models, on
PyTorch Lightning (GRPO family, R3 routing replay, RSPO). How data flows and where each part lives:
docs/architecture.md."""
