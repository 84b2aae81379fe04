"""The RL step without Lightning: π_old pass, mini-/micro-batch updates, global normalisation, the skip
decision, RSPO's weight and statistics reduced by their kind.

Its inputs are explicit (policy, algorithm, :class:`LearnerSettings`, optimizer and scheduler,
``backward``, forward contexts, :class:`~lit_moe_rl.parallel.distributed.Collectives`), so that the
LightningModule (:mod:`lit_moe_rl.module`), Fabric or a plain PyTorch loop can drive it.

- :mod:`.learner`: the :class:`Learner` (one step: skip decision, π_old, updates, timing);
- :mod:`.old_pass`: π_old, reference and RSPO's old routes, ``mismatch/*``, off-policy corrections;
- :mod:`.update`: mini-batch steps, micro-batch losses normalised by global counts, clipping;
- :mod:`.rspo_weight`: RSPO's router-shift weight and ``rspo/*``;
- :mod:`.stats`: statistics accumulated and reduced by kind;
- :mod:`.settings`: :class:`LearnerSettings`.
"""

from lit_moe_rl.learner.learner import ForwardContext, Learner, Phase, Reference
from lit_moe_rl.learner.settings import LearnerSettings
from lit_moe_rl.learner.stats import Gathered, Stats, add_named

__all__ = [
    "ForwardContext",
    "Gathered",
    "Learner",
    "LearnerSettings",
    "Phase",
    "Reference",
    "Stats",
    "add_named",
]
