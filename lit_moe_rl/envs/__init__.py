"""Built-in multi-turn environments (:class:`~lit_moe_rl.rollout.env.Environment`)."""
