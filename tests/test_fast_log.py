"""``lit_moe_rl.fast_log``: Lightning's per-``self.log`` move of a stored metric is skipped only when it
would move nothing; every other move takes Lightning's own path."""

from __future__ import annotations

import torch
from lightning.pytorch.trainer.connectors.logger_connector.result import _Metadata, _ResultMetric, _Sync

from lit_moe_rl import fast_log


def _logged(value: torch.Tensor) -> _ResultMetric:
    meta = _Metadata(fx="training_step", name="policy/loss", on_step=True, on_epoch=False)
    meta.sync = _Sync()
    metric = _ResultMetric(meta, is_tensor=True)
    metric.update(value, batch_size=1)
    return metric


def test_a_metric_already_on_the_device_is_returned_as_is_without_the_walk():
    assert fast_log.install() and fast_log.install()  # idempotent
    metric = _logged(torch.tensor(0.25))
    meta = metric.meta
    assert metric.to(torch.device("cpu")) is metric
    assert metric.meta is meta  # Lightning's walk deep-copies the metadata: it did not run
    assert metric.value.item() == 0.25 and metric._forward_cache.item() == 0.25


def test_a_move_to_another_device_or_with_other_arguments_takes_lightnings_path():
    fast_log.install()
    metric = _logged(torch.tensor(0.5))
    meta = metric.meta
    metric.to(torch.device("meta"))
    assert metric.value.device.type == "meta" and metric._forward_cache.device.type == "meta"
    assert metric.meta is not meta and metric.meta == meta  # the walk ran (and copied the metadata)
    metric = _logged(torch.tensor(0.5))
    meta = metric.meta
    metric.to("cpu")  # not a torch.device: Lightning's path
    assert metric.meta is not meta


def test_a_state_left_on_another_device_takes_lightnings_path(monkeypatch):
    fast_log.install()
    calls = []
    monkeypatch.setattr(fast_log, "_ORIGINAL", lambda metric, *args: calls.append(args) or metric)
    metric = _logged(torch.tensor(1.0))
    metric.to(torch.device("cpu"))
    assert calls == []
    metric._defaults["value"] = metric._defaults["value"].to("meta")  # one tensor two levels down
    metric.to(torch.device("cpu"))
    assert calls == [(torch.device("cpu"),)]
    metric._defaults["value"] = torch.tensor(0.0)
    metric._modules["nested"] = _logged(torch.tensor(2.0))  # a nested metric: always the full walk
    metric.to(torch.device("cpu"))
    assert len(calls) == 2
