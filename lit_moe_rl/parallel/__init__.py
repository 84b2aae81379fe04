"""Cross-rank code: every reduction of a training step and the collectives object the learner takes
(:mod:`.distributed`); FSDP2 sharding and the full copy the rollout engine generates with (:mod:`.sharding`);
mixed precision with fp32 master weights, unsharding for the rollout, optimizer offload, rank-0 loading
(:mod:`.hooks` joins them to the module); the memory planner (``lit-moe-rl plan``); a time limit on the
start-up rendezvous (:mod:`.rendezvous`). Data parallelism only: each rank trains its own slice of the rollout.
"""
