"""One-line error messages for bad settings: jsonargparse's errors rewritten, close names suggested.

Every settings error of ``lit-moe-rl`` ends as ``lit-moe-rl: error: <setting>: <what is wrong>`` on
stderr and exit status 2 (see docs/errors.md). jsonargparse reports an unknown key after a usage
dump and a class that fails to build inside a "Does not validate against any of the Union subtypes"
block; :func:`one_line` keeps the setting's own message and :func:`unknown_key` /
:func:`bad_class_path` add the closest valid names (:mod:`difflib`).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Iterable

UNION_BLOCK = "Does not validate against any of the Union subtypes"
_PARSER_KEY = re.compile(r'^\s*Parser key "([^"]+)":\s*', re.S)
_ARGUMENT_TYPE = re.compile(r"^argument --([\w.]+): (.*)$", re.S)
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (\S+)")
_BAD_PATH = re.compile(r"Expected a path but (\S+) either not accessible or invalid")
_CLASS_PROBLEM = re.compile(r"Problem with given class_path '([^']+)':\s*(.*)", re.S)
_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)")
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_NOT_IN_SUBCOMMAND = re.compile(r"Subcommand '\w+' does not accept option '([^']+)'")
_WRONG_TYPE = re.compile(r"^Expected a <class '(\w+)'>\. Got value: (.*)$")
_EXPECTED = {"bool": "true or false", "float": "a finite float"}  # jsonargparse refuses nan and inf
_ABSTRACT = re.compile(r"Expected an instantiatable class, but (\S*) ?is abstract")
_LITERAL = re.compile(r"Expected a typing\.Literal\[(.*?)\](?:\. Got value: (.*))?$")


class SettingsError(ValueError):
    """A bad setting, already worded as one line naming it."""


def first_line(text: str) -> str:
    """The first non-empty line of ``text``, stripped."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def describe(err: BaseException) -> str:
    """``"Type: first line"`` of an exception from third-party code (torch, HF, PEFT)."""
    return f"{type(err).__name__}: {first_line(str(err)) or repr(err)}"


def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> str:
    """``" (did you mean a, b?)"`` for the candidates closest to ``word``, or ``""``."""
    pool = sorted(set(candidates))
    found = difflib.get_close_matches(word, pool, n=n, cutoff=0.6)
    if not found:  # compare last path components: "algorithms.GPRO" ~ "algorithms.GRPO"
        tails = {c.rsplit(".", 1)[-1]: c for c in pool}
        found = [tails[t] for t in difflib.get_close_matches(word.rsplit(".", 1)[-1], tails, n=n)]
    return f" (did you mean {', '.join(found)}?)" if found else ""


NOT_SETTINGS = {
    "optimizer": "the RL module builds AdamW itself (manual optimisation, several updates per rollout): set "
    "model.lr, model.betas, model.weight_decay",
    "lr_scheduler": "the RL module's schedule is a linear warm-up to model.lr, then constant: set "
    "model.warmup_steps",
}
"""LightningCLI's ``--optimizer``/``--lr_scheduler``, turned off here (``auto_configure_optimizers=False``): what
to set instead. ``sft`` has the same keys (cosine decay after its warm-up)."""


def unknown_key(key: str, known: Iterable[str]) -> str:
    """``"<key>: unknown setting (did you mean ...?)"``; LightningCLI's optimizer keys say what to set instead."""
    root = key.split(".", 1)[0]
    if root in NOT_SETTINGS:
        return f"{key}: not a setting of lit-moe-rl; {NOT_SETTINGS[root]}"
    sections = {key.rsplit(".", i)[0] for i in range(1, key.count(".") + 1)}  # model.lrr: "model" is no fix
    return f"{key}: unknown setting{close_matches(key, (k for k in known if k not in sections))}"


def bad_class_path(key: str, path: str, known: Iterable[str]) -> str:
    """``"<key>: cannot import class '<path>' (did you mean ...?)"``; module members are candidates too."""
    candidates = list(known)
    module, _, _ = path.rpartition(".")
    try:
        mod = importlib.import_module(module)
    except Exception:  # the module itself is wrong: suggest from the known subclasses only
        mod = None
    if mod is not None and not candidates:
        candidates = [f"{module}.{n}" for n, v in vars(mod).items() if inspect.isclass(v) and n[:1] != "_"]
    return f"{key}: cannot import class {path!r}{close_matches(path, candidates)}"


def abstract_class(key: str, path: str, known: list[str], init_args_first: bool) -> str:
    """A base class chosen (or implied by init_args given before any class): name the concrete choices."""
    names = ", ".join(p.rsplit(".", 1)[-1] for p in known) or "a concrete subclass"
    if init_args_first:
        return f"{key}: choose a class before setting its init_args (--{key}=<one of {names}>)"
    return f"{key}: {path} is an abstract base class; choose one of {names}"


def unknown_init_arg(key: str, class_path: str, name: str) -> str:
    """``"<key>.init_args.<name>: not a parameter of <class> (did you mean ...?)"``."""
    try:
        module, _, attr = class_path.rpartition(".")
        params = list(inspect.signature(getattr(importlib.import_module(module), attr)).parameters)
    except Exception:
        params = []
    return f"{key}.init_args.{name}: not a parameter of {class_path}{close_matches(name, params)}"


def one_line(message: str) -> str:
    """The setting's own message from a jsonargparse error text, on one line.

    ``Parser key "k": ... Union subtypes ... Errors: - Problem with given class_path 'X': <msg>`` becomes
    ``<msg>`` when ``<msg>`` names a setting itself, else ``k: <msg>``.
    """
    text = str(message)
    keys: list[str] = []
    for _ in range(10):
        match = _PARSER_KEY.match(text)
        if match:
            keys.append(match.group(1))
            text = text[match.end() :]
        elif UNION_BLOCK in text or _CLASS_PROBLEM.search(text):
            text = _innermost(text)
        else:
            break
    text = " ".join(text.split())
    literal = _LITERAL.search(text)
    if literal:
        got = f", got {literal.group(2)!r}" if literal.group(2) is not None else " (see --help for all forms)"
        text = f"expected one of {literal.group(1)}{got}"
    wrong_type = _WRONG_TYPE.search(text)
    if wrong_type:
        expected, got = wrong_type.groups()
        text = f"expected {_EXPECTED.get(expected, expected)}, got {got!r}"
    if keys and not re.match(r"^[\w.\[\]/]+: ", text):
        text = f"{'.'.join(keys)}: {text}"
    return text


def _innermost(text: str) -> str:
    """Strip Union-subtype blocks and class_path wrappers down to the first real error."""
    for _ in range(10):
        if UNION_BLOCK in text:
            errors = text.split("Errors:", 1)[-1].split("Given value type:", 1)[0]
            items = [i.strip() for i in re.split(r"\n\s*- ", "\n" + errors) if i.strip()]
            items = [i for i in items if not i.startswith("Expected a <class '")] or items
            text = items[0] if items else text.split("\n", 1)[0]
            continue
        problem = _CLASS_PROBLEM.search(text)
        if problem:
            text = problem.group(2)
            continue
        break
    return text.strip()


def parse_error(message: str, known_keys: Iterable[str], subclasses: dict[str, list[str]]) -> str:
    """One line for a jsonargparse parse error: unknown key, bad class_path, bad choice, or the setting's own."""
    text = str(message)
    unknown = _UNRECOGNIZED.search(text)
    if unknown:
        key = unknown.group(1).split("=", 1)[0].lstrip("-")
        return unknown_key(key, known_keys)
    outside = _NOT_IN_SUBCOMMAND.search(text)
    if outside:
        return unknown_key(outside.group(1), known_keys)
    if 'expected "subcommand"' in text:
        return "choose a subcommand: fit, validate or sft (lit-moe-rl --help)"
    choice = _INVALID_CHOICE.search(text)
    if choice:
        names = [c.strip(" '") for c in choice.group(2).split(",")]
        return f"unknown subcommand {choice.group(1)!r} (choose from {', '.join(names)})"
    match = _PARSER_KEY.match(text)
    not_accepted = _NOT_ACCEPTED.search(text)
    problem = _CLASS_PROBLEM.search(text)
    if match and not_accepted and problem:
        return unknown_init_arg(match.group(1), problem.group(1), not_accepted.group(1))
    abstract = _ABSTRACT.search(text)
    if match and abstract:
        bad = _BAD_PATH.search(text)
        path = bad.group(1) if bad else abstract.group(1)
        return abstract_class(match.group(1), path, subclasses.get(match.group(1), []), "NestedArg(" in text)
    bad_path = _BAD_PATH.search(text)
    if match and (bad_path or (problem and "has no attribute" in problem.group(2))):
        path = bad_path.group(1) if bad_path else problem.group(1)
        return bad_class_path(match.group(1), path, subclasses.get(match.group(1), []))
    if match and problem and "No module named" in problem.group(2):
        return bad_class_path(match.group(1), problem.group(1), subclasses.get(match.group(1), []))
    own = _ARGUMENT_TYPE.match(text)  # a plain argparse argument's type refused the value
    if own:
        return f"{own.group(1)}: {one_line(own.group(2))}"
    return one_line(text)
