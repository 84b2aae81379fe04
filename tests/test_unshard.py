"""No resident full copy (issue 16 item 2): the FSDP2 policy unsharded once for the rollout.

Two gloo processes shard a tiny MoE policy. Each rank generates from its resident full copy (today's
``rollout_weights: resident``) and then from the policy itself inside :func:`unsharded` with the same
seed: the tokens, log-probs and R3 routes are identical. The ranks run decode loops of different
lengths (their own ``max_new_tokens``), which a forward with a collective in it would hang on. The
live tensor bytes show the full weights exist only inside the block, and a training forward and
backward afterwards reshard as before.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.test_distributed import free_port

PROMPTS = [["1 2 3 =>", "4 5 =>"], ["6 7 =>", "8 9 10 =>"]]


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        queue.put((rank, _compare(rank)))
    finally:
        dist.destroy_process_group()


def _compare(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from lit_moe_rl.parallel.measure import live_tensor_bytes
    from lit_moe_rl.parallel.sharding import shard_policy, unsharded_copy
    from lit_moe_rl.parallel.unshard import unsharded
    from lit_moe_rl.policy import load_policy, token_logprobs
    from lit_moe_rl.rollout.engine import HFEngine

    torch.set_num_threads(1)
    policy, tok = load_policy("builtin:countdown-tiny-moe")
    policy.config.use_cache = False
    copy = unsharded_copy(policy)
    full_bytes = sum(p.numel() * p.element_size() for p in copy.parameters())
    shard_policy(policy, init_device_mesh("cpu", (2,)))
    engine = HFEngine(max_new_tokens=5 + 4 * rank)  # rank 1 runs 4 more forwards than rank 0

    def generate(model):
        engine.bind(model, tok)
        torch.manual_seed(1234 + rank)
        return engine.generate(PROMPTS[rank], n=3, record_routes=True)

    resident = generate(copy)
    del copy
    engine.model = None
    gc.collect()
    base = live_tensor_bytes()
    with unsharded(policy) as whole:
        during = live_tensor_bytes()
        ours = generate(whole)
    engine.model = None
    gc.collect()
    after = live_tensor_bytes()
    logp, _, _ = token_logprobs(policy, ours.input_ids, ours.attention_mask, ours.prompt_len)
    logp.sum().backward()  # a training step's forward and backward: collectives as before
    gc.collect()
    return {
        "tokens": torch.equal(resident.input_ids, ours.input_ids),
        "logp": torch.equal(resident.infer_logp, ours.infer_logp),
        "routes": resident.routes is not None and torch.equal(resident.routes, ours.routes),
        "steps": ours.input_ids.shape[1] - ours.prompt_len,
        "full": full_bytes,
        "during": during - base,
        "after": after - base,
        "after_update": live_tensor_bytes() - base,
        "grads": all(p.grad is not None for p in policy.parameters() if p.requires_grad),
    }


def test_unsharded_policy_generates_the_resident_copys_tokens_and_routes_without_keeping_a_copy():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0]["steps"] != results[1]["steps"]  # different loop lengths: no collective inside
    for rank, out in results.items():
        assert out["tokens"] and out["logp"] and out["routes"], (rank, out)
        full = out["full"]
        assert out["during"] >= 0.9 * full, (rank, out)  # the full weights exist during generation...
        assert abs(out["after"]) < 0.05 * full, (rank, out)  # ...and not after: no resident copy
        assert out["grads"], rank
        # gradients (the shards' size) are the only new state after a training backward
        assert out["after_update"] < 0.6 * full, (rank, out)


@pytest.mark.parametrize("dtype", ["same", "bfloat16"])
def test_an_engine_with_its_own_weights_is_refused_under_unshard(dtype):
    from lit_moe_rl.errors import SettingsError
    from lit_moe_rl.parallel.unshard import check_engine
    from lit_moe_rl.rollout.engine import HFEngine

    if dtype == "same":
        check_engine(HFEngine())
        return
    with pytest.raises(SettingsError, match="rollout.engine.dtype: bfloat16"):
        check_engine(HFEngine(dtype=dtype))


def test_cli_unshard_with_r3_rspo_offload_and_export_equals_the_resident_copy(tmp_path):
    """``lit-moe-rl fit`` on 2 gloo ranks with ``rollout_weights: unshard`` and ``offload_optimizer``
    against today's resident copy, two steps each: R3 records on the unsharded policy and replays on
    the sharded one, the optimizer state makes a round trip to host memory around each rollout, rank 0
    alone reads the checkpoint and rank 1 receives its shards (the policy's and the reference model's),
    and the HF export gathers the full weights. Every logged metric and every weight is the same.
    (2 ranks against 1 process: tests/test_distributed_e2e.py, one step.)"""
    import transformers

    from tests.test_distributed_e2e import FSDP2, R3, fit

    extra = [
        *R3, "--model.algorithm=lit_moe_rl.algorithms.RSPO", "--model.algorithm.kl_coef=0.05",
        "--trainer.callbacks+=lit_moe_rl.callbacks.ReferenceKLCallback",
        "--model.config=null", "--model.pretrained=builtin:countdown-tiny-moe",
    ]  # fmt: skip
    export = [
        "--trainer.callbacks+=lit_moe_rl.callbacks.HFExportCallback",
        f"--trainer.callbacks.dirpath={tmp_path / 'hf'}",
    ]
    memory = ["--model.rollout_weights=unshard", "--model.offload_optimizer=true"]
    ours = fit(tmp_path / "unshard", *FSDP2, *memory, *extra, *export, devices=2, batch_size=2, steps=2)
    today = fit(tmp_path / "resident", *FSDP2, *extra, devices=2, batch_size=2, steps=2)
    assert len(ours[0]) == len(today[0]) == 2
    for mine, theirs in zip(ours[0], today[0], strict=True):
        for key, value in theirs.items():
            if not key.startswith(("perf/", "step", "epoch")):
                assert mine[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert ours[0][1]["policy/kl_loss"] > 0 and ours[0][1]["routing/rollout_train_overlap_at_k"] == 1.0
    for name, value in today[1].items():
        assert torch.equal(ours[1][name], value), name
    exported = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", local_files_only=True
    ).state_dict()
    for name, value in ours[1].items():
        assert torch.equal(exported[name.removeprefix("policy.")], value), name
