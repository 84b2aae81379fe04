"""Cross-rank reductions: the loss-scaling rule, the metric reductions, the rank-aware sampler and
per-prompt seeding, checked in one process and in 2 gloo processes."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_moe_rl.data.sampler import ResumableSampler
from lit_moe_rl.learner.stats import Gathered, Stats, add_named
from lit_moe_rl.losses import grpo_loss
from lit_moe_rl.parallel import distributed as D
from lit_moe_rl.rollout.engine import Generation
from lit_moe_rl.rollout.per_prompt import concat_generations, prompt_seed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------- the scaling rule
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_rank_losses_scaled_by_w_over_global_counts_average_to_the_global_gradient(agg):
    """W ranks, each normalising by the global count and scaling by W; DDP averages: the global mean."""
    torch.manual_seed(0)
    w, n, t = 3, 4, 5
    theta = torch.randn(n * w, t, requires_grad=True)  # one "log-prob" per token, the parameter
    old = torch.randn(n * w, t)
    adv = torch.randn(n * w)
    mask = torch.rand(n * w, t) > 0.3
    mask[:, 0] = True
    full, _ = grpo_loss(theta, old, adv, mask, agg=agg, norm_const=t)
    (expected,) = torch.autograd.grad(full, theta)
    counts = dict(num_tokens=float(mask.sum()), num_seqs=float(n * w), norm_const=float(t))
    grads = torch.zeros_like(theta)
    for rank in range(w):  # each rank's whole slice, its loss scaled by W
        rows = slice(rank * n, (rank + 1) * n)
        loss, _ = grpo_loss(theta[rows], old[rows], adv[rows], mask[rows], agg=agg, **counts)
        (grad,) = torch.autograd.grad(loss * w, theta)
        grads += grad / w  # DDP's average
    torch.testing.assert_close(grads, expected, rtol=1e-6, atol=1e-7)
    # without the global count (each rank its own mean) the result is a mean of means: different
    own = sum(
        torch.autograd.grad(grpo_loss(theta[r * n : (r + 1) * n], old[r * n : (r + 1) * n],
                                      adv[r * n : (r + 1) * n], mask[r * n : (r + 1) * n], agg=agg,
                                      norm_const=t)[0], theta)[0] for r in range(w)
    ) / w  # fmt: skip
    if agg == "token-mean":
        assert not torch.allclose(own, expected, atol=1e-6)


def test_single_process_reductions_are_identities():
    cpu = torch.device("cpu")
    assert D.world_size() == 1 and D.loss_scale() == 1.0
    assert D.global_counts(7.0, 2.0, 12.0, cpu) == (7.0, 2.0, 12.0)
    assert D.max_over_ranks(3, cpu) == 3
    assert D.all_finite(True, cpu) and not D.all_finite(False, cpu)
    stats = Stats()
    add_named(stats, {"policy/loss": float("nan"), "policy/ppo_kl": 0.5}, tokens=3.0)
    logged = stats.reduce(D.Collectives(cpu))
    assert logged["policy/ppo_kl"] == 0.5 and logged["policy/loss"] != logged["policy/loss"]  # NaN kept


def test_reduction_of_each_metric_family():
    assert D.reduction_of("policy/loss") == "sum"
    assert D.reduction_of("reward/errors") == "sum"
    assert D.reduction_of("policy/ratio_max") == "max"
    assert D.reduction_of("rollout/response_length_max") == "max"
    assert D.reduction_of("policy/ratio_min") == "min"
    assert D.reduction_of("policy/clipfrac") == "token_mean"
    assert D.reduction_of("mismatch/train_infer_kl") == "token_mean"
    assert D.reduction_of("rspo/layer_shift/0") == "token_mean"
    assert D.reduction_of("policy/grad_norm") == "mean"
    assert D.reduction_of("reward/mean") == "mean"
    assert D.reduction_of("routing/fallback_tokens") == "sum"
    assert D.reduction_of("routing/rollout_train_router_disagreement") == "token_mean"
    assert D.reduction_of("routing/store_bytes") == "mean"


def _two_rank_worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cpu = torch.device("cpu")
        out = {
            "scale": D.loss_scale(),
            "counts": D.global_counts([10.0, 30.0][rank], [2.0, 6.0][rank], [8.0, 12.0][rank], cpu),
            "max": D.max_over_ranks([1, 4][rank], cpu),
            "finite": D.all_finite(rank == 0, cpu),  # rank 1 saw a NaN: both skip
        }
        values = {
            "policy/loss": [0.25, 0.5][rank],  # shares of one global loss: summed
            "policy/clipfrac": [0.1, 0.3][rank],  # token mean, weights 10 and 30
            "policy/ratio_max": [1.5, 1.2][rank],
            "reward/mean": [0.0, 1.0][rank],
        }
        if rank == 1:
            values["rspo/gamma_mean"] = 0.9  # a metric one rank lacks cannot hang the others
        collectives = D.Collectives(cpu)
        stats = Stats()
        add_named(stats, values, tokens=[10.0, 30.0][rank])
        stats.gathered("reward/std", Gathered(torch.tensor([[0.0, 1.0], [2.0, 5.0]][rank])))
        stats.gathered("rspo/gamma_p50", Gathered(torch.arange(3.0) + 3 * rank, "quantile", 0.5))
        out["metrics"] = stats.reduce(collectives)
        again = Stats()
        add_named(again, {"policy/loss": 1.0}, tokens=1.0)
        out["again"] = again.reduce(collectives)  # no state carried
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_agree_on_counts_skips_and_metrics():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_two_rank_worker, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for rank in (0, 1):
        out = results[rank]
        assert out["scale"] == 2.0
        assert out["counts"] == (40.0, 8.0, 12.0)
        assert out["max"] == 4
        assert out["finite"] is False
        m = out["metrics"]
        assert m["policy/loss"] == pytest.approx(0.75)
        assert m["policy/clipfrac"] == pytest.approx((0.1 * 10 + 0.3 * 30) / 40)
        assert m["policy/ratio_max"] == pytest.approx(1.5)
        assert m["reward/mean"] == pytest.approx(0.5)
        assert m["rspo/gamma_mean"] == pytest.approx(0.9)  # rank 0 contributed weight 0
        assert out["again"]["policy/loss"] == pytest.approx(2.0)
        assert m["reward/std"] == pytest.approx(float(torch.tensor([0.0, 1.0, 2.0, 5.0]).std()))  # pooled
        assert m["rspo/gamma_p50"] == pytest.approx(2.5)  # median of 0..5, not the mean of 1 and 4


# ------------------------------------------------------------------ the sampler
def test_two_ranks_of_b_draw_the_prompts_of_one_process_of_2b_step_by_step():
    one = list(ResumableSampler(21, seed=3))
    ranks = [list(ResumableSampler(21, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 10  # the odd row out is dropped
    b = 3
    for step in range(3):
        union = set(ranks[0][step * b : (step + 1) * b]) | set(ranks[1][step * b : (step + 1) * b])
        assert union == set(one[step * 2 * b : (step + 1) * 2 * b])


def test_a_resumed_rank_continues_its_own_stream():
    full = list(ResumableSampler(20, seed=1, num_replicas=2, rank=1))
    resumed = ResumableSampler(20, seed=1, num_replicas=2, rank=1)
    resumed.resume_at(0, 4)
    assert list(resumed) == full[4:]
    assert list(resumed) == full  # the skip applies once


def test_bad_rank_is_an_error():
    with pytest.raises(ValueError, match="rank 2"):
        ResumableSampler(4, seed=0, num_replicas=2, rank=2)


# ----------------------------------------------------------- per-prompt seeding
def _gen(prompt_len: int, response_len: int, n: int, fill: int) -> Generation:
    ids = torch.full((n, prompt_len + response_len), fill)
    return Generation(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        response_mask=torch.ones(n, response_len, dtype=torch.bool),
        prompt_len=prompt_len,
        infer_logp=torch.full((n, response_len), -1.0),
        truncated=torch.zeros(n, dtype=torch.bool),
        routes=torch.full((n, prompt_len + response_len, 2, 1), fill, dtype=torch.int8),
    )


def test_concat_generations_pads_prompts_left_and_responses_right():
    out = concat_generations([_gen(2, 3, 1, 5), _gen(4, 1, 2, 7)], pad_token_id=0)
    assert out.prompt_len == 4 and out.input_ids.shape == (3, 7)
    assert out.input_ids[0].tolist() == [0, 0, 5, 5, 5, 5, 5]
    assert out.attention_mask[0].tolist() == [0, 0, 1, 1, 1, 1, 1]
    assert out.input_ids[1].tolist() == [7, 7, 7, 7, 7, 0, 0]
    assert out.response_mask[1].tolist() == [True, False, False]
    assert out.infer_logp[1].tolist() == [-1.0, 0.0, 0.0]
    assert out.routes[0, :, 0, 0].tolist() == [-1, -1, 5, 5, 5, 5, 5]
    assert out.routes[1, :, 0, 0].tolist() == [7, 7, 7, 7, 7, -1, -1]


def test_a_prompts_completions_do_not_depend_on_its_batch():
    from lit_moe_rl.policy import load_policy
    from lit_moe_rl.rollout.engine import HFEngine
    from lit_moe_rl.rollout.per_prompt import generate_per_prompt

    torch.manual_seed(0)
    policy, tokenizer = load_policy(None, {"family": "qwen3_moe"})
    engine = HFEngine(max_new_tokens=5)
    engine.bind(policy, tokenizer)
    alone = generate_per_prompt(engine, ["4 9 => 13 ="], n=3, seed=1, step=2, positions=[1])
    batch = generate_per_prompt(engine, ["12 7 3 => 40 =", "4 9 => 13 ="], n=3, seed=1, step=2)
    r = alone.response_mask.shape[1]
    assert torch.equal(batch.input_ids[3:, batch.prompt_len :][:, :r], alone.input_ids[:, alone.prompt_len :])
    torch.testing.assert_close(batch.infer_logp[3:, :r], alone.infer_logp)
    assert (
        prompt_seed(1, 2, "a")
        != prompt_seed(1, 3, "a")
        != prompt_seed(2, 2, "a")
        != prompt_seed(1, 2, "a", 1)
    )
    chat = [{"role": "user", "content": "a"}]
    assert prompt_seed(1, 2, chat) == prompt_seed(1, 2, [dict(chat[0])]) != prompt_seed(1, 2, "a")


def test_the_same_prompt_twice_in_a_step_samples_two_groups(monkeypatch):
    """Per-prompt seeds mix in the prompt's position in the step's global batch (``i · W + rank``): a
    duplicated prompt, on one rank or on two, gets two different groups of completions."""
    from lit_moe_rl.policy import load_policy
    from lit_moe_rl.rollout import per_prompt
    from lit_moe_rl.rollout.engine import HFEngine

    torch.manual_seed(0)
    policy, tokenizer = load_policy(None, {"family": "qwen3_moe"})
    engine = HFEngine(max_new_tokens=6)
    engine.bind(policy, tokenizer)
    prompt = "4 9 => 13 ="
    twice = per_prompt.generate_per_prompt(engine, [prompt, prompt], n=3, seed=1, step=2)
    assert not torch.equal(twice.infer_logp[:3], twice.infer_logp[3:])
    monkeypatch.setattr(per_prompt, "is_distributed", lambda: True)  # rank 1 of 2 holds global position 1
    monkeypatch.setattr(per_prompt, "world_size", lambda: 2)
    monkeypatch.setattr(per_prompt.dist, "get_rank", lambda: 1)
    assert per_prompt.global_positions(3) == [1, 3, 5]
    on_rank_1 = per_prompt.generate_per_prompt(engine, [prompt], n=3, seed=1, step=2)
    torch.testing.assert_close(on_rank_1.infer_logp, twice.infer_logp[3:])


def test_datamodule_splits_prompts_by_rank_and_refuses_a_batch_no_rank_can_fill():
    from types import SimpleNamespace

    from lit_moe_rl.data.datamodule import PromptDataModule

    settings = dict(
        template="compact", min_numbers=3, max_numbers=3, max_number=20, max_target=100, num_val=0
    )
    loaders = []
    for rank in (0, 1):
        dm = PromptDataModule(num_train=8, batch_size=2, **settings)
        dm.trainer = SimpleNamespace(
            strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})
        )
        dm.setup()
        loaders.append([prompt for batch in dm.train_dataloader() for prompt in batch["prompt"]])
    assert len(loaders[0]) == len(loaders[1]) == 4 and not set(loaders[0]) & set(loaders[1])
    dm = PromptDataModule(num_train=3, batch_size=2, **settings)
    dm.trainer = SimpleNamespace(
        strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 0})
    )
    dm.setup()
    with pytest.raises(ValueError, match="data.batch_size: 2 prompts per rank"):
        dm.train_dataloader()
