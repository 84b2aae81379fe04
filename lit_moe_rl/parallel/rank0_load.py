"""One host copy of the checkpoint per node: rank 0 reads it, the other ranks build the model on the
meta device (no memory) and receive their FSDP2 shards from rank 0.

Today's path loads the whole checkpoint on every rank (and a resident copy deep-copies it): ~122 GB of
host memory per rank for Qwen3-30B-A3B in bf16, ~1 TB per 8-GPU node. Here rank 0 alone calls
``from_pretrained``; every rank shards its model; ``set_model_state_dict(..., StateDictOptions(
full_state_dict=True, broadcast_from_rank0=True))`` (``torch.distributed.checkpoint.state_dict``)
broadcasts rank 0's full tensors one at a time and each rank keeps its shard of each. Buffers that are
not in the state dict (RoPE ``inv_freq``, computed at init) are broadcast from rank 0 too.

Used with ``model.rollout_weights: unshard`` (a resident copy needs the full weights on every rank
anyway) and ``model.pretrained`` on more than one rank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import transformers
from torch import Tensor, nn


def loads_on_rank0(hp: Any, mesh: Any) -> bool:
    """True when the policy comes from a checkpoint, is sharded over ranks, and keeps no resident copy."""
    return (
        hp.get("pretrained") is not None
        and mesh is not None
        and mesh.size() > 1
        and hp.get("rollout_weights", "resident") == "unshard"
    )


def skeleton_policy(pretrained: str, *, dtype: str, tokenizer: str | None) -> tuple[nn.Module, Any]:
    """``(model on the meta device, tokenizer)`` for checkpoint folder ``pretrained``: the model class,
    config and generation config the checkpoint's own ``from_pretrained`` gives, no weights."""
    from pathlib import Path

    from lit_moe_rl.policy import (
        DTYPES,
        load_tokenizer,
        naming_setting,
        require_causal_lm,
        resolve_pretrained,
    )

    path = resolve_pretrained(pretrained)
    with naming_setting("model.pretrained", path):
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        require_causal_lm(config, path)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
        if (Path(path) / "generation_config.json").is_file():
            model.generation_config = transformers.GenerationConfig.from_pretrained(
                path, local_files_only=True
            )
    tok_path = tokenizer or path
    with naming_setting("model.tokenizer" if tokenizer else "model.pretrained", tok_path):
        tok = load_tokenizer(tok_path, model.config.vocab_size)
    return model, tok


def load_on_rank0(
    pretrained: str, config: Any = None, *, dtype: str, tokenizer: str | None, **kwargs: Any
) -> tuple[nn.Module, Any]:
    """Rank 0: the checkpoint loaded (:func:`~lit_moe_rl.policy.load_policy`); other ranks: a skeleton."""
    if dist.get_rank() == 0:
        from lit_moe_rl.policy import load_policy

        return load_policy(pretrained, config, dtype=dtype, tokenizer=tokenizer, **kwargs)
    return skeleton_policy(pretrained, dtype=dtype, tokenizer=tokenizer)


def full_state(policy: nn.Module) -> dict[str, Tensor] | None:
    """Rank 0's full state dict, taken before sharding (the tensors it broadcasts); None elsewhere."""
    return policy.state_dict() if dist.get_rank() == 0 else None


def _device() -> torch.device:
    """The device collectives of the default group run on (CUDA for NCCL, the CPU for gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def receive_shards(policy: nn.Module, state: dict[str, Tensor] | None) -> None:
    """Every rank, after sharding: fill each rank's shards from rank 0's ``state``, then the buffers.
    A collective: all ranks call it at the same point."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(p.is_meta for p in policy.parameters()):
        policy.to_empty(device=_device())  # allocate this rank's shards only; the broadcast copies into them
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(policy, state or {}, options=options)
    broadcast_buffers(policy)


@torch.no_grad()
def broadcast_buffers(policy: nn.Module) -> None:
    """Give every rank rank 0's buffers (values and dtypes; FSDP2 does not shard buffers)."""
    device = _device()
    names = [name for name, _ in policy.named_buffers()]
    infos = (
        [[(tuple(b.shape), b.dtype) for _, b in policy.named_buffers()]] if dist.get_rank() == 0 else [None]
    )
    dist.broadcast_object_list(infos, src=0)
    for name, (shape, dtype) in zip(names, infos[0], strict=True):
        owner_name, _, leaf = name.rpartition(".")
        owner = policy.get_submodule(owner_name) if owner_name else policy
        buf = owner._buffers[leaf]
        value = buf.to(device) if dist.get_rank() == 0 else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(value, src=0)
        owner._buffers[leaf] = value if dist.get_rank() != 0 else buf
