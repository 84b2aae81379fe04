"""The memory planner: per-rank GPU memory and per-node host memory of an RL run, before launch.

Every part is arithmetic on the model's parameter shapes (built on the meta device: exact counts) and
the run's settings, in two phases a step alternates between:

* **generation**: sharded parameters, the optimizer state (unless ``model.offload_optimizer``), the full
  weights (``rollout_weights: unshard``: all-gathered in the compute dtype for the rollout only;
  ``resident``: a copy kept all the time), an engine's own copy (``rollout.engine.dtype``), the KV cache
  at the engine's token budget, R3's recorded routes and the sampling logits;
* **update**: sharded parameters, gradients and AdamW state (two moments in the parameters' dtype,
  Loshchilov & Hutter 2019), a resident copy if any, FSDP2's all-gather window (two units' full
  weights in the compute dtype: the one running and the one prefetched), decoder activations of one
  micro-batch (every layer's, or with gradient checkpointing each layer's input plus one layer's
  recomputation; Chen et al. 2016), and the log-prob chunk's fp32 logits.

Activations are estimated per token and layer from the shapes (attention projections, the top-k routed
tokens' expert intermediates); parameters, gradients, optimizer state, full weights and the KV cache are
exact sizes. ``bench/plan_check.py`` compares the resident parts with measurement on CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

GiB = 1024**3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEADROOM_FRACTION = 0.05  # allocator fragmentation and the CUDA context: planned against 95% ...
HEADROOM_BYTES = 1 * GiB  # ... minus 1 GiB (or 5% more of a small one) of each GPU
PERSISTENT = (
    "sharded parameters",
    "AdamW state",
    "resident full copy",
    "engine's own copy",
    "reference model",
)
GPU_CHUNK_BYTES = 1 * GiB  # the default log-prob chunk budget on a GPU (policy.logprob_chunk_tokens)


@dataclass
class ModelShape:
    """What the planner needs of a model: exact parameter counts and the shapes activations follow."""

    name: str
    params: int  # every parameter
    trained: int  # those that require grad (LoRA: the adapters)
    largest_unit: int  # the largest FSDP2 unit (a decoder layer, or the embeddings / LM head)
    layers: int
    hidden: int
    q_dim: int  # heads x head_dim
    kv_dim: int  # kv heads x head_dim
    vocab: int
    experts: int  # 0 for a dense model
    top_k: int
    expert_inter: int  # an expert's intermediate size (the dense MLP's for a dense model)


@dataclass
class PlanSettings:
    """The run's settings that memory depends on (from a config file or a live Trainer)."""

    ranks: int = 1  # data-parallel ranks (GPUs)
    ranks_per_node: int = 1
    sharded: bool = False  # FSDP2 (ModelParallelStrategy); else every rank holds everything (DDP)
    weight_dtype: str = "float32"  # the trained (sharded) parameters'
    compute_dtype: str = "float32"  # forward/backward and the rollout's weights
    load_dtype: str = "float32"  # the checkpoint as loaded on the host
    rollout_weights: str = "resident"
    engine_dtype: str | None = None  # an engine's own copy
    offload_optimizer: bool = False
    rank0_load: bool = False  # one host copy per node (rank 0 reads, the others receive shards)
    reference: bool = False  # a reference model (kl_coef > 0), sharded like the policy
    micro_batch_size: int = 16
    prompt_tokens: int = 512
    max_new_tokens: int = 64
    prompts_per_rank: int = 2  # data.batch_size
    group_size: int = 8
    max_batch_tokens: int | None = None
    gradient_checkpointing: bool = False
    logprob_chunk_tokens: int | None = None
    record_routes: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def rows_per_rank(self) -> int:
        return self.prompts_per_rank * self.group_size

    @property
    def seq_len(self) -> int:
        return self.prompt_tokens + self.max_new_tokens

    def with_(self, **changes) -> PlanSettings:
        return dataclasses.replace(self, notes=list(self.notes), **changes)


@dataclass
class Plan:
    """Bytes per part and phase (``None``: not present in that phase), the peak, and the verdict."""

    shape: ModelShape
    settings: PlanSettings
    gpu: dict[str, tuple[int | None, int | None]]
    host: dict[str, int]
    capacity: int | None = None  # one GPU's memory, when known
    host_capacity: int | None = None
    fixes: list[str] = field(default_factory=list)

    @property
    def generation_peak(self) -> int:
        return sum(g or 0 for g, _ in self.gpu.values())

    @property
    def update_peak(self) -> int:
        return sum(u or 0 for _, u in self.gpu.values())

    @property
    def peak(self) -> int:
        return max(self.generation_peak, self.update_peak)

    @property
    def resident(self) -> int:
        """What stays allocated between steps (after an update, before the next rollout): the sharded
        parameters, AdamW's state (offloaded only while generating), a resident or engine copy, a reference."""
        return sum(u or 0 for name, (_, u) in self.gpu.items() if name.startswith(PERSISTENT))

    @property
    def usable(self) -> int | None:
        if self.capacity is None:
            return None
        return int(self.capacity * (1 - HEADROOM_FRACTION)) - min(
            HEADROOM_BYTES, int(self.capacity * HEADROOM_FRACTION)
        )

    @property
    def fits(self) -> bool | None:
        return None if self.usable is None else self.peak <= self.usable

    def gpu_kv(self) -> int:
        return next((g or 0 for name, (g, _) in self.gpu.items() if name.startswith("KV cache")), 0)

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def host_fits(self) -> bool | None:
        return None if self.host_capacity is None else self.host_total <= self.host_capacity


def _share(count: int, settings: PlanSettings) -> float:
    """A sharded quantity's per-rank share (FSDP2), or all of it (no sharding)."""
    return count / settings.ranks if settings.sharded else count


def kv_tokens(settings: PlanSettings) -> int:
    """Tokens whose keys and values are cached at once: the engine's budget, else every row's full length."""
    if settings.max_batch_tokens is not None:
        return settings.max_batch_tokens
    return settings.rows_per_rank * settings.seq_len


def activation_elements_per_token_layer(shape: ModelShape) -> int:
    """Saved activations of one token in one decoder layer, in compute-dtype elements: the attention
    block (norm input/output, q, k, v, normed and rotated q/k, attention output, residual) and the MLP
    (norm, router logits in fp32, and for each of the top-k routed copies: the gathered input, the
    gate/up projection, the activation, the product and the down projection)."""
    h, q, kv = shape.hidden, shape.q_dim, shape.kv_dim
    attention = 3 * h + 4 * q + 5 * kv
    routed = max(shape.top_k, 1) * (3 * h + 4 * shape.expert_inter)
    router = 4 * shape.experts  # logits and probabilities, fp32 (2 elements of 2 bytes each)
    return attention + 2 * h + routed + router


def activation_bytes(shape: ModelShape, settings: PlanSettings) -> int:
    """One micro-batch's decoder activations in the update (with or without gradient checkpointing)."""
    tokens = settings.micro_batch_size * settings.seq_len
    b = BYTES[settings.compute_dtype]
    per_layer = activation_elements_per_token_layer(shape) * tokens * b
    final = 2 * shape.hidden * tokens * b  # final norm output and the gathered response hidden states
    if settings.gradient_checkpointing:
        return shape.layers * shape.hidden * tokens * b + per_layer + final
    return shape.layers * per_layer + final


def chunk_tokens(shape: ModelShape, settings: PlanSettings) -> int:
    if settings.logprob_chunk_tokens:
        return settings.logprob_chunk_tokens
    return max(1, min(4096, GPU_CHUNK_BYTES // (4 * shape.vocab)))


def logprob_chunk_bytes(shape: ModelShape, settings: PlanSettings) -> int:
    """fp32 logits of one chunk, their softmax (entropy) and their gradient: 3 x [chunk, V] x 4 B."""
    return 3 * chunk_tokens(shape, settings) * shape.vocab * 4


def make_plan(shape: ModelShape, settings: PlanSettings, capacity: int | None = None,
              host_capacity: int | None = None) -> Plan:  # fmt: skip
    """Every part's bytes per rank in each phase, and the host memory per node."""
    s = settings
    w, c = BYTES[s.weight_dtype], BYTES[s.compute_dtype]
    params = int(_share(shape.params, s) * w)
    grads = int(_share(shape.trained, s) * w)
    adam = int(_share(shape.trained, s) * 2 * w)
    full = shape.params * c
    resident = s.sharded and s.rollout_weights == "resident"
    gpu: dict[str, tuple[int | None, int | None]] = {
        f"sharded parameters ({s.weight_dtype})": (params, params),
        f"gradients ({s.weight_dtype})": (None, grads),
        f"AdamW state ({s.weight_dtype})": (None if s.offload_optimizer else adam, adam),
    }
    if s.sharded and resident:  # a deep copy of the policy: the trained weights' dtype
        copy = shape.params * w
        gpu[f"resident full copy ({s.weight_dtype})"] = (copy, copy)
    elif s.sharded:  # all-gathered into MixedPrecisionPolicy.param_dtype
        gpu[f"full weights for the rollout ({s.compute_dtype})"] = (full, None)
    if s.sharded:
        gpu[f"FSDP2 all-gather window ({s.compute_dtype})"] = (None, 2 * shape.largest_unit * c)
    if s.engine_dtype is not None:
        copy = shape.params * BYTES[s.engine_dtype]
        gpu[f"engine's own copy ({s.engine_dtype})"] = (copy, copy)
    if s.reference:
        ref = int(_share(shape.params, s) * w)
        gpu["reference model"] = (ref, ref)
    kv_per_token = 2 * shape.layers * shape.kv_dim * c
    gpu[f"KV cache ({kv_tokens(s):,} tokens x {kv_per_token // 1024} KiB)"] = (
        kv_tokens(s) * kv_per_token,
        None,
    )
    rows = s.rows_per_rank if s.max_batch_tokens is None else max(1, s.max_batch_tokens // s.seq_len)
    prefill = s.prompts_per_rank * s.prompt_tokens * activation_elements_per_token_layer(shape) * c
    gpu["generation transients (sampling logits, a prefill layer)"] = (
        rows * shape.vocab * 4 * 2 + prefill,
        None,
    )
    if s.record_routes:
        gpu["R3 routes (int16)"] = (s.rows_per_rank * s.seq_len * shape.layers * shape.top_k * 2, None)
    ckpt = "with" if s.gradient_checkpointing else "without"
    gpu[f"activations ({ckpt} gradient checkpointing)"] = (None, activation_bytes(shape, s))
    gpu[f"log-prob chunk ({chunk_tokens(shape, s)} tokens)"] = (None, logprob_chunk_bytes(shape, s))
    return Plan(shape, s, gpu, host_plan(shape, s), capacity, host_capacity)


def host_plan(shape: ModelShape, s: PlanSettings) -> dict[str, int]:
    """Host memory per node: the loaded checkpoint (one copy with rank-0 loading, else one per rank, and
    a second per rank for a resident copy taken on the host), offloaded AdamW state, recorded routes."""
    load = shape.params * BYTES[s.load_dtype]
    copies = 1 if s.rank0_load else s.ranks_per_node
    host = {f"checkpoint loaded ({copies} cop{'y' if copies == 1 else 'ies'})": load * copies}
    if s.sharded and s.rollout_weights == "resident":
        host["resident copies taken on the host"] = load * s.ranks_per_node
    if s.offload_optimizer:
        host["offloaded AdamW state (pinned)"] = (
            int(_share(shape.trained, s) * 2 * BYTES[s.weight_dtype]) * s.ranks_per_node
        )
    if s.record_routes:
        host["R3 routes of a rollout"] = (
            s.rows_per_rank * s.seq_len * shape.layers * shape.top_k * 2 * s.ranks_per_node
        )
    return host


# ------------------------------------------------------------------ what would make it fit
FIXES = (
    ("model.rollout_weights: unshard", lambda s: s.sharded and s.rollout_weights == "resident",
     lambda s: s.with_(rollout_weights="unshard")),
    ("rollout.engine.dtype: same", lambda s: s.engine_dtype is not None, lambda s: s.with_(engine_dtype=None)),
    ("model.offload_optimizer: true", lambda s: not s.offload_optimizer, lambda s: s.with_(offload_optimizer=True)),
    ("model.gradient_checkpointing: true", lambda s: not s.gradient_checkpointing,
     lambda s: s.with_(gradient_checkpointing=True)),
    ("model.micro_batch_size: 1", lambda s: s.micro_batch_size > 1, lambda s: s.with_(micro_batch_size=1)),
    ("model.logprob_chunk_size: 512", lambda s: (s.logprob_chunk_tokens or 4096) > 512,
     lambda s: s.with_(logprob_chunk_tokens=512)),
)  # fmt: skip


def suggest_fixes(plan: Plan) -> list[str]:
    """Settings that, applied in order until the plan fits, make it fit; then the KV budget or more GPUs."""
    if plan.fits is not False:
        return []
    settings, chosen, peak = plan.settings, [], plan.peak
    for name, applies, apply in FIXES:
        if not applies(settings):
            continue
        trial = make_plan(plan.shape, apply(settings), plan.capacity)
        if trial.peak >= peak:
            continue  # it does not lower the phase that sets the peak
        settings, peak = apply(settings), trial.peak
        chosen.append(name)
        if trial.fits:
            return chosen
    trial = make_plan(plan.shape, settings, plan.capacity)
    spare = trial.usable - (trial.generation_peak - trial.gpu_kv())
    per_token = 2 * plan.shape.layers * plan.shape.kv_dim * BYTES[settings.compute_dtype]
    if spare > per_token * settings.seq_len:
        budget = spare // per_token
        rows = budget // settings.seq_len
        return [*chosen, f"KV cache for {rows} rows per rank: data.batch_size x rollout.group_size <= {rows} "
                f"(or rollout.max_batch_tokens: {budget})"]  # fmt: skip
    return [*chosen, "more GPUs (trainer.devices / data_parallel_size) or a shorter max_new_tokens"]


# ------------------------------------------------------------------ the printout
def _amount(value: int | None, unit: int) -> str:
    return "-" if value is None else f"{value / unit:.1f}"


def format_plan(plan: Plan, source: str = "") -> str:
    """The table ``lit-moe-rl plan`` prints and ``fit`` shows when it refuses."""
    s, shape = plan.settings, plan.shape
    unit, unit_name = (GiB, "GiB") if max(plan.peak, plan.host_total) >= GiB else (1024**2, "MiB")

    def _gib(value: int | None) -> str:
        return _amount(value, unit)

    lines = [
        f"memory plan{' for ' + source if source else ''}: {shape.name}, {shape.params / 1e9:.2f}B parameters "
        f"({shape.trained / 1e9:.3f}B trained), {s.ranks} rank(s){', FSDP2' if s.sharded else ''}, "
        f"weights {s.weight_dtype}, compute {s.compute_dtype}, rollout weights {s.rollout_weights}",
        f"{'per-rank GPU memory (' + unit_name + ')':<58}{'generation':>11}{'update':>9}",
    ]
    for name, (gen, upd) in plan.gpu.items():
        lines.append(f"  {name:<56}{_gib(gen):>11}{_gib(upd):>9}")
    lines.append(f"  {'total':<56}{_gib(plan.generation_peak):>11}{_gib(plan.update_peak):>9}")
    other = s.with_(gradient_checkpointing=not s.gradient_checkpointing)
    lines.append(
        f"  activations {'without' if s.gradient_checkpointing else 'with'} gradient checkpointing would be "
        f"{_gib(activation_bytes(shape, other))} {unit_name}"
    )
    lines.append(f"  resident between steps: {_gib(plan.resident)} {unit_name}")
    if plan.capacity is not None:
        verdict = "fits" if plan.fits else "DOES NOT FIT"
        phase = "generation" if plan.generation_peak >= plan.update_peak else "update"
        lines.append(
            f"  peak {_gib(plan.peak)} {unit_name} ({phase}) of {_gib(plan.usable)} {unit_name} usable on a "
            f"{_gib(plan.capacity)} {unit_name} GPU: {verdict}"
        )
        if not plan.fits:
            part = max(
                plan.gpu.items(), key=lambda kv: (kv[1][0] or 0) if phase == "generation" else (kv[1][1] or 0)
            )
            lines.append(f"  largest part in the {phase}: {part[0]}")
            lines.append("  would fit with: " + "; ".join(suggest_fixes(plan)))
    lines.append(f"host memory per node ({s.ranks_per_node} rank(s)), {unit_name}")
    for name, value in plan.host.items():
        lines.append(f"  {name:<56}{_gib(value):>11}")
    host_line = f"  {'total':<56}{_gib(plan.host_total):>11}"
    if plan.host_capacity is not None:
        host_line += f" of {_gib(plan.host_capacity)}: {'fits' if plan.host_fits else 'DOES NOT FIT'}"
    lines.append(host_line)
    lines += [f"  note: {note}" for note in s.notes]
    return "\n".join(lines)
