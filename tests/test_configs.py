"""Every YAML in configs/ parses through the CLI, and every callback snippet names real classes."""

from __future__ import annotations

import importlib

import pytest
import yaml

from lit_moe_rl.cli import main
from tests.helpers import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SNIPPETS = sorted((ROOT / "callbacks").glob("*.yaml"))


def test_there_are_configs_and_snippets():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "quickstart_sft.yaml"} <= names
    assert SNIPPETS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path, capsys):
    command = ["sft"] if path.name.endswith("_sft.yaml") else ["fit"]
    with pytest.raises(SystemExit) as exc:
        main([*command, f"--config={path}", "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "model" in printed and "data" in printed and "trainer" in printed


def _class_paths(node):
    if isinstance(node, dict):
        if "class_path" in node:
            yield node["class_path"]
        for value in node.values():
            yield from _class_paths(value)
    elif isinstance(node, list):
        for value in node:
            yield from _class_paths(value)


@pytest.mark.parametrize("path", SNIPPETS, ids=lambda p: p.name)
def test_callback_snippet_names_importable_classes(path):
    paths = list(_class_paths(yaml.safe_load(path.read_text())))
    assert paths, f"{path.name} names no class_path"
    for class_path in paths:
        module, _, name = class_path.rpartition(".")
        assert hasattr(importlib.import_module(module), name), class_path
