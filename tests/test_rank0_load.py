"""One host copy per node (issue 16 item 4): rank 0 reads the checkpoint, rank 1 builds on the meta
device and receives its shards. Two gloo processes: rank 1's host memory grows by its own shard plus
less than a third of the model, and its shards and buffers equal those of today's path (every rank
loads the checkpoint, then shards)."""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.test_distributed import free_port


def _save_model(path) -> int:
    """A ~150 MB (fp32) Qwen3-MoE of many tensors of at most 6 MB with the char tokenizer; returns its bytes."""
    import transformers

    from lit_moe_rl.policy import char_tokenizer

    config = transformers.Qwen3MoeConfig(
        vocab_size=4096, hidden_size=384, intermediate_size=768, moe_intermediate_size=256, num_hidden_layers=12,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=8, num_experts_per_tok=2,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _worker(rank: int, port: int, path: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        queue.put((rank, _load(str(path))))
    except Exception as err:  # the test reports it instead of waiting for the queue
        queue.put((rank, {"error": repr(err)}))
        raise
    finally:
        dist.destroy_process_group()


def _load(path: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from lit_moe_rl.parallel.measure import current_rss_bytes, peak_rss_bytes, reset_peak_rss
    from lit_moe_rl.parallel.rank0_load import full_state, load_on_rank0, receive_shards, skeleton_policy
    from lit_moe_rl.parallel.sharding import shard_policy
    from lit_moe_rl.policy import load_policy

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2,))
    skeleton_policy(
        path, dtype="float32", tokenizer=None
    )  # imports (the model's module, the tokenizer) first
    from torch.distributed.checkpoint import state_dict as _imported  # noqa: F401

    gc.collect()
    before = current_rss_bytes()
    assert reset_peak_rss()
    policy, _ = load_on_rank0(path, dtype="float32", tokenizer=None)
    state = full_state(policy)
    shard_policy(policy, mesh)
    receive_shards(policy, state)
    del state
    growth = peak_rss_bytes() - before
    own = sum(p.to_local().numel() * p.element_size() for p in policy.parameters())
    today, _ = load_policy(path, dtype="float32")  # every rank reads the checkpoint
    shard_policy(today, mesh)
    same = all(
        torch.equal(a.to_local(), b.to_local())
        for a, b in zip(policy.parameters(), today.parameters(), strict=True)
    )
    buffers = all(
        torch.equal(a, b) and a.dtype == b.dtype
        for a, b in zip(policy.buffers(), today.buffers(), strict=True)
    )
    meta = any(t.is_meta for t in [*policy.parameters(), *policy.buffers()])
    return {"growth": growth, "own": own, "same": same, "buffers": buffers, "meta": meta,
            "eos": policy.generation_config.eos_token_id == today.generation_config.eos_token_id}  # fmt: skip


def test_rank1_receives_its_shards_without_a_host_copy_of_the_model(tmp_path):
    model_bytes = _save_model(tmp_path)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, tmp_path, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=180) for _ in procs)
    assert not any("error" in out for out in results.values()), results
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, out in results.items():
        assert out["same"] and out["buffers"] and out["eos"] and not out["meta"], (rank, out)
    rank1 = results[1]
    extra = rank1["growth"] - rank1["own"]  # on CPU the shard itself is host memory
    assert extra < model_bytes / 3, (extra, model_bytes, rank1)
    assert results[0]["growth"] > model_bytes  # rank 0 holds the one host copy
    print(
        f"model {model_bytes / 2**20:.0f} MiB; rank 1 peak growth {rank1['growth'] / 2**20:.0f} MiB of which its "
        f"shard {rank1['own'] / 2**20:.0f} MiB; rank 0 {results[0]['growth'] / 2**20:.0f} MiB"
    )
