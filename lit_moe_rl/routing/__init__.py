"""MoE routing: find each family's routers (:mod:`.adapters`), record and replay their top-K choices (R3,
R2), store routes compactly, measure RSPO's router shift (:mod:`.shift`), and check routes against a model."""
