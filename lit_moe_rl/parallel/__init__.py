"""Cross-rank code: every reduction of a training step and the collectives object the learner takes
(:mod:`.distributed`), and FSDP2 sharding, its mixed precision and the full copy the rollout engine
generates with (:mod:`.sharding`), and a time limit on the start-up rendezvous (:mod:`.rendezvous`). Data
parallelism only: each rank trains its own slice of the rollout.
"""
