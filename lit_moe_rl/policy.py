"""Load a Hugging Face MoE causal LM and compute per-token log-probs of given tokens.

Models come from a local directory (``from_pretrained``, offline), from a built-in asset
(``builtin:<name>``, shipped inside the package), or are built with random weights from an
inline config: either a full HF config dict (with ``model_type``) or ``{"family": "qwen3_moe", ...}``
for a tiny config of a supported family (:mod:`lit_moe_rl.tiny`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from lit_moe_rl.errors import describe
from lit_moe_rl.experts import apply_experts_implementation, real_tokens_only

if TYPE_CHECKING:
    from lit_moe_rl.learner.prefix import SharedPrefix

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
CHAR_ALPHABET = "0123456789+-*/() =>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_pretrained(pretrained: str) -> Path:
    """Map ``pretrained`` to an existing local directory, or fail in one line naming the setting."""
    if pretrained.startswith(BUILTIN_PREFIX):
        name = pretrained[len(BUILTIN_PREFIX) :]
        path = Path(str(resources.files("lit_moe_rl") / "assets" / name))
        if not (path / "config.json").is_file():
            available = sorted(p.name for p in path.parent.iterdir() if (p / "config.json").is_file())
            raise ValueError(f"model.pretrained: no built-in model {name!r}; available: {available}")
        return path
    path = Path(pretrained).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model.pretrained: {pretrained!r} has no config.json")
        return path
    looks_like_hub_id = pretrained.count("/") == 1 and not pretrained.startswith((".", "/", "~"))
    hint = " (hub ids need network: download it first and pass the local folder)" if looks_like_hub_id else ""
    raise ValueError(f"model.pretrained: {pretrained!r} is not a local directory{hint}")


def char_tokenizer(alphabet: str = CHAR_ALPHABET) -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer: ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3, then ``alphabet``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def build_config(config: dict[str, Any]) -> transformers.PretrainedConfig:
    """A transformers config from an inline dict: ``{"family": ...}`` (tiny) or ``{"model_type": ...}``."""
    from lit_moe_rl.tiny import tiny_moe_config

    config = dict(config)
    if "family" in config:
        return tiny_moe_config(config.pop("family"), **config)
    if "model_type" not in config:
        raise ValueError("model.config: needs 'family' (a tiny model) or 'model_type' (a full HF config)")
    return transformers.AutoConfig.for_model(**config)


def load_policy(
    pretrained: str | None = None,
    config: dict[str, Any] | None = None,
    *,
    dtype: str = "float32",
    tokenizer: str | None = None,
    seed: int = 0,
) -> tuple[nn.Module, Any]:
    """Return ``(model, tokenizer)``; exactly one of ``pretrained`` / ``config`` must be given."""
    if (pretrained is None) == (config is None):
        raise ValueError("model: set exactly one of model.pretrained (a local folder) or model.config")
    torch_dtype = DTYPES[dtype]
    if pretrained is not None:
        path = resolve_pretrained(pretrained)
        with naming_setting("model.pretrained", path):
            require_causal_lm(transformers.AutoConfig.from_pretrained(path, local_files_only=True), path)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, local_files_only=True
            )
        tok_path = tokenizer or path
    else:
        with torch.random.fork_rng(), naming_setting("model.config", config):
            torch.manual_seed(seed)
            built = build_config(config)
            check_model_config(built, "model.config")
            model = transformers.AutoModelForCausalLM.from_config(built, dtype=torch_dtype)
            probe_forward(model)
        tok_path = tokenizer
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise ValueError(
            f"model.tokenizer: {tokenizer!r} is not a local folder (models and tokenizers load offline)"
        )
    if tok_path is not None:
        require_tokenizer_files(tok_path, "model.tokenizer" if tokenizer else "model.pretrained")
    with naming_setting("model.tokenizer" if tokenizer else "model.pretrained", tok_path):
        tok = load_tokenizer(tok_path, model.config.vocab_size)
    note_aux_loss(model.config)
    apply_experts_implementation(model)  # auto: lit_moe_rl/experts.py
    return model, tok


CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
)  # fmt: skip


def require_causal_lm(config: transformers.PretrainedConfig, path: Any) -> None:
    """The folder holds a decoder-only causal LM (a BERT or T5 would load as a random-headed model)."""
    architectures = list(getattr(config, "architectures", None) or [])
    causal = any(a.endswith(CAUSAL_LM_SUFFIXES) for a in architectures) if architectures else (
        type(config) in transformers.MODEL_FOR_CAUSAL_LM_MAPPING and not getattr(config, "is_encoder_decoder", False)
    )  # fmt: skip
    if not causal:
        found = ", ".join(architectures) or f"model_type {config.model_type!r}"
        raise ValueError(
            f"model.pretrained: {path} holds a {found}, not a causal LM: lit-moe-rl trains decoder-only (MoE) "
            "language models such as Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3 or GPT-OSS"
        )


def require_tokenizer_files(path: Any, setting: str) -> None:
    """A tokenizer folder has a tokenizer file (without one, transformers falls back to a tokenizer that
    turns every prompt into nothing)."""
    folder = Path(path)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{setting}: {path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); copy the "
            "tokenizer into it, or set model.tokenizer to a folder that has one"
        )


def check_model_config(config: transformers.PretrainedConfig, setting: str) -> None:
    """Shapes transformers accepts in a config but fails on in the first forward, named in one line."""
    top_k = getattr(config, "num_experts_per_tok", None)
    experts = next(
        (getattr(config, n) for n in ("num_experts", "num_local_experts", "n_routed_experts") if getattr(config, n, None)),
        None,
    )  # fmt: skip
    if isinstance(top_k, int) and isinstance(experts, int) and top_k > experts:
        raise ValueError(f"{setting}: num_experts_per_tok {top_k} is more than the {experts} experts")
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    explicit_head_dim = getattr(config, "head_dim", None)
    if (
        isinstance(heads, int)
        and isinstance(hidden, int)
        and heads > 0
        and hidden > 0
        and explicit_head_dim is None
    ):
        if hidden % heads:
            raise ValueError(
                f"{setting}: hidden_size {hidden} is not divisible by num_attention_heads {heads} "
                "(or set head_dim)"
            )
        if (hidden // heads) % 2 and (
            getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None)
        ):
            raise ValueError(
                f"{setting}: hidden_size {hidden} / num_attention_heads {heads} = {hidden // heads}, an odd head "
                "size, which rotary position embeddings cannot rotate (make it even)"
            )
    kv_heads = getattr(config, "num_key_value_heads", None)
    if isinstance(heads, int) and isinstance(kv_heads, int) and kv_heads > 0 and heads % kv_heads:
        raise ValueError(
            f"{setting}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )


def probe_forward(model: nn.Module) -> None:
    """One two-token forward of a freshly built model, so that any shape transformers rejects fails here,
    under the setting's name, instead of in the first rollout. Skipped for weights not yet materialised."""
    param = next(model.parameters(), None)
    if param is None or param.device.type == "meta":
        return
    ids = torch.zeros((1, 2), dtype=torch.long, device=param.device)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)


@contextlib.contextmanager
def naming_setting(setting: str, value: Any) -> Iterator[None]:
    """Re-raise a torch / HF / safetensors error while loading as one line naming ``setting``.

    A truncated or garbage ``model.safetensors`` (``SafetensorError``), a missing tokenizer file
    (``OSError``), an inline config with impossible sizes (``RuntimeError``): the user sees which setting
    and file to fix, not a traceback. Our own one-line ``ValueError``s pass through unchanged.
    """
    try:
        yield
    except ValueError as err:
        if str(err).startswith(("model.", "model ")):
            raise
        raise ValueError(f"{setting}: cannot load {_short(value)} ({describe(err)})") from None
    except (OSError, RuntimeError, TypeError, KeyError, ImportError) as err:
        raise ValueError(f"{setting}: cannot load {_short(value)} ({describe(err)})") from None
    except Exception as err:  # safetensors' SafetensorError derives from Exception only
        if type(err).__name__ != "SafetensorError":
            raise
        raise ValueError(
            f"{setting}: {_short(value)} has a truncated or corrupt .safetensors file ({describe(err)})"
        ) from None


def _short(value: Any, limit: int = 120) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_tokenizer(path: str | os.PathLike | None, vocab_size: int) -> Any:
    """The tokenizer at ``path`` (left padding, a pad token), or the char tokenizer when ``None``."""
    if path is None:
        tok = char_tokenizer()
    else:
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    if len(tok) > vocab_size:
        raise ValueError(f"model.tokenizer: {len(tok)} tokens do not fit the model's vocab_size {vocab_size}")
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def note_aux_loss(config: transformers.PretrainedConfig) -> None:
    coef = getattr(config, "router_aux_loss_coef", None)
    if coef:
        log.info(
            "checkpoint config has router_aux_loss_coef=%s: the load-balancing aux loss is OFF during RL "
            "(set model.router_aux_loss_coef to turn it on)",
            coef,
        )


def load_balancing_loss(model: nn.Module) -> Any:
    """``(router_logits, attention_mask) -> aux loss`` with the family's own HF load-balancing loss.

    Raises a one-line error naming the setting for families without one (DeepSeek-V3 balances with its
    selection bias instead).
    """
    import sys

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    fn = getattr(sys.modules[type(base).__module__], "load_balancing_loss_func", None)
    if fn is None:
        raise ValueError(
            f"model.router_aux_loss_coef: {base.config.model_type} has no load-balancing loss in transformers"
        )
    from lit_moe_rl.routing.adapters import moe_layout

    _, top_k, num_experts = moe_layout(model)
    return lambda router_logits, attention_mask: fn(router_logits, num_experts, top_k, attention_mask)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids as ``generate`` computes them for left-padded batches."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def _chunk_logp(
    head: nn.Module, hidden: Tensor, targets: Tensor, temperature: float, want_entropy: bool
) -> tuple[Tensor, Tensor]:
    logits = head(hidden).float()  # [c, V]
    if temperature != 1.0:
        logits = logits / temperature
    logz = torch.logsumexp(logits, dim=-1)  # [c]
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz  # [c]
    if not want_entropy:
        return logp, torch.zeros_like(logp)
    probs = torch.softmax(logits, dim=-1)
    entropy = logz - (probs * logits).sum(-1)  # [c]
    return logp, entropy


def token_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    prompt_len: int,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
    prefix: SharedPrefix | None = None,
    skip_padding: bool = False,
    **forward_kwargs: Any,
) -> tuple[Tensor, Tensor | None, Any]:
    """Log-probs ``[N, R]`` (and entropies) of the response tokens ``input_ids[:, prompt_len:]``.

    The decoder runs once, or with ``prefix`` twice: each distinct prompt once, then the responses on
    its KV cache (:mod:`lit_moe_rl.learner.prefix`). The LM head and log-softmax then run only on the
    response tokens that exist (``attention_mask`` 1; padding gets log-prob and entropy 0), flattened
    across rows and taken ``chunk_size`` tokens at a time (default :func:`logprob_chunk_tokens`). Under
    grad each chunk is checkpointed, so at most one chunk of fp32 logits ``[chunk_size, V]`` is alive in the
    forward and again in the backward, whatever the batch size and response length. Logits are
    divided by ``temperature`` so that the trainer scores the distribution the engine sampled from.
    ``skip_padding``: the experts compute no padding token (:func:`lit_moe_rl.experts.real_tokens_only`;
    not under gradient checkpointing, whose recomputation runs outside this call).
    Returns ``(logp, entropy or None, decoder outputs)``.
    """
    if skip_padding and torch.is_grad_enabled():
        _require_no_checkpointing(model)
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    if prefix is None:
        with real_tokens_only(attention_mask if skip_padding else None):
            out = decoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
                **forward_kwargs,
            )
        hidden = out.last_hidden_state[:, prompt_len - 1 : -1]  # [N, R, H]: positions predicting the response
    else:
        hidden, out = _shared_prefix_hidden(
            decoder, model.config, input_ids, attention_mask, prefix, forward_kwargs, skip_padding
        )
    targets = input_ids[:, prompt_len:]  # [N, R]
    where = attention_mask[:, prompt_len:].reshape(-1).nonzero().squeeze(-1)  # [n] real response tokens
    hidden_n = hidden.reshape(-1, hidden.shape[-1]).index_select(0, where)  # [n, H]
    targets_n = targets.reshape(-1).index_select(0, where)  # [n]
    chunk_size = chunk_size or logprob_chunk_tokens(model.config.get_text_config().vocab_size, hidden.device)
    logps, ents = [], []
    for start in range(0, where.numel(), chunk_size):
        args = (head, hidden_n[start : start + chunk_size], targets_n[start : start + chunk_size])
        if torch.is_grad_enabled() and hidden.requires_grad:
            lp, ent = checkpoint(_chunk_logp, *args, temperature, with_entropy, use_reentrant=False)
        else:
            lp, ent = _chunk_logp(*args, temperature, with_entropy)
        logps.append(lp)
        ents.append(ent)
    logp = _scatter_tokens(logps, where, targets.shape, hidden)
    entropy = _scatter_tokens(ents, where, targets.shape, hidden).detach() if with_entropy else None
    return logp, entropy, out


def _require_no_checkpointing(model: nn.Module) -> None:
    """Skipped padding and gradient checkpointing do not mix: the backward recomputes each layer outside
    the forward that said which tokens are padding (the recomputation would save other tensors)."""
    from lit_moe_rl.routing.replay import checkpointing_active

    if checkpointing_active(model):
        raise ValueError("token_logprobs: skip_padding under gradient checkpointing; pass skip_padding=False")


def cache_kwarg(decoder: nn.Module) -> str:
    """Name of the decoder's KV-cache argument (``cache`` since transformers 5.2x, ``past_key_values`` before)."""
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _shared_prefix_hidden(
    decoder: nn.Module,
    config: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    prefix: SharedPrefix,
    forward_kwargs: dict[str, Any],
    skip_padding: bool,
) -> tuple[Tensor, Any]:
    """Hidden states ``[N, R, H]`` at the positions predicting the response, the prompts run once.

    The ``U`` distinct prompts run with a KV cache; the cache is expanded to the ``N`` rows
    (``batch_select_indices``: differentiable, so each prompt's gradient is the sum over its rows) and
    the responses run on it with the full ``[N, P + R]`` mask and their own position ids, as the single
    forward would see them. The first response token is predicted by the prompt's last position."""
    positions = position_ids_from_mask(attention_mask)
    prompt_ids, response_ids = prefix.split(input_ids)
    prompt_mask, _ = prefix.split(attention_mask)
    prompt_pos, response_pos = prefix.split(positions)
    kwarg = cache_kwarg(decoder)
    cache = DynamicCache(config=config)
    with real_tokens_only(prompt_mask if skip_padding else None):
        prompt_out = decoder(
            input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_pos, use_cache=True,
            **{kwarg: cache}, **forward_kwargs,
        )  # fmt: skip
    cache.batch_select_indices(prefix.inverse.to(input_ids.device))
    with real_tokens_only(attention_mask[:, prefix.prompt_len :] if skip_padding else None):
        out = decoder(
            input_ids=response_ids, attention_mask=attention_mask, position_ids=response_pos, use_cache=True,
            **{kwarg: cache}, **forward_kwargs,
        )  # fmt: skip
    last_prompt = prefix.expand(prompt_out.last_hidden_state[:, -1:])  # [N, 1, H]
    return torch.cat([last_prompt, out.last_hidden_state[:, :-1]], dim=1), out


CPU_CHUNK_BYTES = 32 * 2**20  # glibc's largest mmap threshold: bigger blocks are mmap'd and faulted anew
GPU_CHUNK_BYTES = 2**30  # PyTorch's caching allocator reuses blocks: the cap is memory, not churn


def logprob_chunk_tokens(vocab_size: int, device: torch.device) -> int:
    """Default tokens per LM-head chunk: the most whose fp32 logits ``[tokens, V]`` fit the device's budget.

    On CPU the budget is 32 MiB. glibc serves larger blocks with a fresh ``mmap`` that is page-faulted
    and zeroed on every use: at V = 151,936, chunks of 1024 tokens spent more time faulting pages in
    the kernel than computing (``bench/logprob_chunks.py``). At most 55 tokens there; 4096 at most for
    small vocabularies. On a GPU the budget is 1 GiB (1,766 tokens at V = 151,936).
    """
    budget = GPU_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    return max(1, min(4096, budget // (4 * vocab_size)))


def _scatter_tokens(parts: list[Tensor], where: Tensor, shape: torch.Size, like: Tensor) -> Tensor:
    """Per-token values of the real tokens ``where`` (flat indices) back into a zero ``[N, R]``."""
    flat = torch.zeros(shape.numel(), dtype=torch.float32, device=like.device)
    if parts:
        flat = flat.index_copy(0, where, torch.cat(parts))
    return flat.view(shape)


# Module attributes that HF models read as a dropout or noise probability in training mode only
# (attention modules' ``attention_dropout``, Mixtral's router ``jitter_noise``, ...).
STOCHASTIC_ATTRS = ("attention_dropout", "dropout", "hidden_dropout", "activation_dropout", "jitter_noise")


def set_training_mode(model: nn.Module) -> int:
    """Put ``model`` in training mode once, with every dropout and router noise zeroed; returns how many
    were non-zero.

    RL needs a deterministic policy: the importance ratio π_θ/π_old is exactly 1 at the first update only
    if both passes compute the same function (LoRA dropout gave ppo_kl 0.0097 there). Eval mode would do
    that too but turns HF's gradient checkpointing off (it recomputes only in training mode), so dropout
    is zeroed instead: ``nn.Dropout`` modules (PEFT's ``lora_dropout`` included) get ``p = 0``, float
    attributes of :data:`STOCHASTIC_ATTRS` become 0, and the config's ``*dropout``/``*jitter*`` values too.
    """
    zeroed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.p, zeroed = 0.0, zeroed + 1
        for name in STOCHASTIC_ATTRS:
            value = getattr(module, name, None)
            if isinstance(value, float) and not isinstance(value, bool) and value > 0:
                setattr(module, name, 0.0)
                zeroed += 1
    config = getattr(model, "config", None)
    for key, value in (vars(config) if config is not None else {}).items():
        if ("dropout" in key or "jitter" in key) and isinstance(value, float) and value > 0:
            setattr(config, key, 0.0)
    model.train()
    return zeroed


def prepare_for_rl(model: nn.Module, *, gradient_checkpointing: bool = False) -> int:
    """Make a loaded policy ready for RL updates: gradient checkpointing when asked, no KV cache, and
    :func:`set_training_mode` (the one mode of every forward); returns how many dropouts were zeroed."""
    if gradient_checkpointing:
        enable_checkpointing(model)
    model.config.use_cache = False
    return set_training_mode(model)


def enable_checkpointing(model: nn.Module) -> None:
    """transformers' non-reentrant activation checkpointing: ``activation_checkpointing_enable``, or its
    older name ``gradient_checkpointing_enable`` (a deprecated alias that warns in newer transformers)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_rl_policy(
    hp: Any, *, seed: int, router_shift: bool, loader: Any = None
) -> tuple[nn.Module, Any, int]:
    """The policy of an RL run from the module's ``model.*`` settings ``hp``: :func:`load_policy`, LoRA
    when asked, checked (an MoE when ``router_shift`` is tracked; a family with a load-balancing loss when
    it is weighted) and :func:`prepare_for_rl`. Returns ``(policy, tokenizer, dropouts zeroed)``."""
    from lit_moe_rl.lora import apply_lora
    from lit_moe_rl.routing.checks import require_moe

    policy, tokenizer = (loader or load_policy)(
        hp["pretrained"], hp["config"], dtype=hp["dtype"], tokenizer=hp["tokenizer"], seed=seed
    )
    apply_experts_implementation(policy, hp.get("experts_implementation", "auto"))  # every rank's copy
    if hp["lora"]:
        policy = apply_lora(policy, hp["lora"])
    if router_shift:
        require_moe(policy, "router_shift")
    if hp["router_aux_loss_coef"] > 0:
        load_balancing_loss(policy)  # fails now on a family without one
    return policy, tokenizer, prepare_for_rl(policy, gradient_checkpointing=hp["gradient_checkpointing"])


def save_hf_folder(model: nn.Module, tokenizer: Any, path: str) -> None:
    """Save ``model`` (a PEFT model with its LoRA merged into a copy) and ``tokenizer`` as a Hugging Face
    folder that ``from_pretrained`` loads."""
    if hasattr(model, "merge_and_unload"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
