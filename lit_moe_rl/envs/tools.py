"""A tool environment: plain Python functions become tools the model calls in Qwen3's format.

The model writes ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; the turn stops at
``</tool_call>`` (nothing after it is sampled, so nothing after it is trained), the call runs and its
result returns as a ``tool`` message. A bad call (no JSON, an unknown tool, wrong arguments) or a tool
that raises returns an ``Error: ...`` text to the model and never crashes the run. A turn without a
tool call is the final answer: the trajectory ends (score it with ``rollout.reward`` on the whole
transcript, or override :meth:`ToolEnv.final_reward`).

Schemas follow the OpenAI/Qwen function format, built from each function's signature (JSON types
from annotations) and docstring (first paragraph: the description; ``Args:`` lines: the parameters'),
and are listed in a system message as Qwen3's chat template lists ``tools``.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from typing import Any

from lit_moe_rl.rollout.env import Environment, import_path

__all__ = ["ToolEnv", "parse_tool_call", "tool_schema"]

_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}
_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def _arg_docs(doc: str) -> dict[str, str]:
    """``{name: description}`` from a Google-style ``Args:`` section."""
    out, in_args = {}, False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped in ("Args:", "Arguments:"):
            in_args = True
        elif in_args and re.match(r"^\w+( \(.*\))?:", stripped):
            name, _, text = stripped.partition(":")
            out[name.split(" ")[0]] = text.strip()
        elif in_args and stripped.endswith(":") and not line.startswith(" " * 8):
            in_args = False
    return out


def tool_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """``{"type": "function", "function": {name, description, parameters}}`` of a Python function."""
    doc = inspect.getdoc(fn) or ""
    args = _arg_docs(doc)
    properties, required = {}, []
    for name, param in inspect.signature(fn).parameters.items():
        annotation = param.annotation if param.annotation is not inspect.Parameter.empty else str
        annotation = {"int": int, "float": float, "str": str, "bool": bool}.get(annotation, annotation)
        spec = {"type": _JSON_TYPES.get(annotation, "string")}
        if name in args:
            spec["description"] = args[name]
        properties[name] = spec
        if param.default is inspect.Parameter.empty:
            required.append(name)
    description = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
    parameters = {"type": "object", "properties": properties, "required": required}
    return {
        "type": "function",
        "function": {"name": fn.__name__, "description": description, "parameters": parameters},
    }


def parse_tool_call(action: str) -> tuple[str, dict[str, Any]] | None:
    """``(name, arguments)`` of the turn's last ``<tool_call>``; None when there is none.

    Raises:
        ValueError: the call is not ``{"name": str, "arguments": {...}}`` JSON (the message goes to the model).
    """
    calls = _CALL.findall(action)
    if not calls:
        return None
    try:
        call = json.loads(calls[-1])
    except json.JSONDecodeError as err:
        raise ValueError(f"the tool call is not valid JSON ({err.msg})") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise ValueError('a tool call must be {"name": ..., "arguments": {...}}')
    arguments = call.get("arguments", {})
    if not isinstance(arguments, dict):
        raise ValueError("the tool call's arguments must be a JSON object")
    return call["name"], arguments


class ToolEnv(Environment):
    """Tools from Python functions; each call's result (or error) is the next observation.

    Args:
        tools: The functions, or their import paths ``pkg.mod.fn``.
        max_calls: Tool calls per trajectory; a turn calling past it ends the trajectory.
        system: Text before the tool list in the system message.
    """

    stop_strings = ("</tool_call>",)

    def __init__(self, tools: list[Callable[..., Any] | str], max_calls: int = 4, system: str = "") -> None:
        fns = [import_path(t) if isinstance(t, str) else t for t in tools]
        self.tools = {fn.__name__: fn for fn in fns}
        self.schemas = [tool_schema(fn) for fn in fns]
        self.max_calls = max_calls
        self.system = system

    def system_message(self) -> str:
        """The tool list in Qwen3's wording (what its template renders for ``tools=``)."""
        listing = "\n".join(json.dumps(s) for s in self.schemas)
        return (
            f"{self.system}\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{listing}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
            "</tool_call>"
        ).lstrip()

    def reset(self, sample: dict[str, Any], prompt: Any) -> Any:
        self.sample, self.calls = sample, 0
        user = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return [{"role": "system", "content": self.system_message()}] + [
            m for m in user if m["role"] != "system"
        ]

    def final_reward(self, action: str) -> float:
        """Reward of the final answer (default 0: score the transcript with ``rollout.reward``)."""
        return 0.0

    def step(self, action: str) -> tuple[Any, float, bool]:
        try:
            call = parse_tool_call(action)
        except ValueError as err:
            return self._tool_message(f"Error: {err}"), 0.0, False
        if call is None:
            return None, self.final_reward(action), True
        self.calls += 1
        if self.calls > self.max_calls:
            return None, 0.0, True
        return self._tool_message(self.run(*call)), 0.0, False

    def run(self, name: str, arguments: dict[str, Any]) -> str:
        """The tool's result as text, or ``Error: ...`` (unknown tool, bad arguments, a raising tool)."""
        fn = self.tools.get(name)
        if fn is None:
            return f"Error: unknown tool {name!r}; tools: {', '.join(self.tools)}"
        try:
            return str(fn(**arguments))
        except Exception as err:  # a tool's failure is the model's observation, never the run's crash
            return f"Error: {type(err).__name__}: {err}"

    @staticmethod
    def _tool_message(text: str) -> list[dict[str, Any]]:
        return [{"role": "tool", "content": text}]
