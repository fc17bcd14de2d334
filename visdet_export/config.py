"""Reading loss configs without running them: JSON, TOML and MMDetection-style Python configs.

MMEngine's ``Config.fromfile`` executes ``.py`` configs; this module never does. A Python config is parsed with
:mod:`ast` and only these constructs are accepted:

* literals (numbers, strings, ``True``/``False``/``None``) and a sign in front of a number;
* ``dict(key=value, ...)``, and list / tuple / dict displays (``[...]``, ``(...)``, ``{"key": value}``) of those;
* plain ``name = value`` assignments at the top level (``_base_ = "base.py"`` or a list of such paths included),
  and string expressions (docstrings);
* names assigned above in the same file (``num_classes = 80`` ... ``num_classes=num_classes``);
* arithmetic on numbers (``beta=1.0 / 9.0``: ``+ - * / // % **``, a power's exponent at most 64 in size), ``+`` of
  two strings or two lists, and a list of numbers or strings times a number (``[1.0] * 80``); a string or list
  so made has at most 100000 items.

Anything else -- imports, calls other than ``dict``, attribute access, names a ``_base_`` file defines, f-strings,
lambdas, comprehensions, ``{{_base_.x}}`` references -- is refused with a :class:`ConfigError` that names the file,
the line and the construct, before any of the config is used. Numbers must be finite everywhere (NaN and infinity
are refused in every format).

``_base_`` files are followed only inside the directory tree of the config that was opened, or of its parent
when that holds a ``_base_`` folder (MMDetection's ``configs/<model>/x.py`` with ``../_base_/...``), after
resolving symlinks, and merged the way MMEngine merges them: a child's keys override its bases', dicts are merged
recursively, and a dict with ``_delete_=True`` replaces the base's dict instead of being merged into it.

Every ``loss_*`` entry at any depth (also keys such as ``initial_loss_cls``) is collected with its dotted path,
list positions included: ``model.roi_head.bbox_head.0.loss_cls``.

>>> cfg = parse_loss_string('dict(type="FocalLoss", gamma=2.0)')
>>> cfg
{'type': 'FocalLoss', 'gamma': 2.0}
>>> collect_losses({"model": {"bbox_head": {"loss_cls": cfg, "num_classes": 80}}})
{'model.bbox_head.loss_cls': {'type': 'FocalLoss', 'gamma': 2.0}}
"""

from __future__ import annotations

import ast
import copy
import json
import math
import operator
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .validation import ConfigError

CONFIG_SUFFIXES = (".py", ".json", ".toml")
MAX_CONFIG_BYTES = 8 << 20  # configs are small; refuse anything that is clearly not one
MAX_DEPTH = 64
DELETE_KEY = "_delete_"
BASE_KEY = "_base_"

_ALLOWED = (
    "literals, dict(...), list/tuple/dict displays of literals, arithmetic on numbers, names assigned above "
    "and `name = value` assignments"
)
MAX_EXPONENT = 64
MAX_LIST_ITEMS = 100_000
_ARITHMETIC = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}

_CONSTRUCTS: dict[type, str] = {
    ast.Import: "an import",
    ast.ImportFrom: "an import",
    ast.Attribute: "attribute access",
    ast.JoinedStr: "an f-string",
    ast.FormattedValue: "an f-string",
    ast.Lambda: "a lambda",
    ast.ListComp: "a list comprehension",
    ast.SetComp: "a set comprehension",
    ast.DictComp: "a dict comprehension",
    ast.GeneratorExp: "a generator expression",
    ast.BinOp: "an arithmetic expression",
    ast.BoolOp: "a boolean expression",
    ast.Compare: "a comparison",
    ast.IfExp: "a conditional expression",
    ast.Subscript: "subscripting",
    ast.Starred: "unpacking (*)",
    ast.Set: "a set",
    ast.NamedExpr: "an assignment expression (:=)",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
    ast.FunctionDef: "a function definition",
    ast.AsyncFunctionDef: "a function definition",
    ast.ClassDef: "a class definition",
    ast.If: "an if statement",
    ast.For: "a for loop",
    ast.While: "a while loop",
    ast.With: "a with statement",
    ast.Try: "a try statement",
    ast.Raise: "a raise statement",
    ast.Assert: "an assert statement",
    ast.Delete: "a del statement",
    ast.Global: "a global statement",
    ast.Nonlocal: "a nonlocal statement",
    ast.AugAssign: "an augmented assignment",
    ast.AnnAssign: "an annotated assignment",
    ast.Return: "a return statement",
    ast.Pass: "a pass statement",
}


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.Call):
        return f"a call to {ast.unparse(node.func)}()"
    if isinstance(node, ast.Name):
        return (
            f"the variable reference {node.id!r} (only names assigned above in the same file are resolved; "
            "write the value of a name from a _base_ file)"
        )
    if isinstance(node, ast.Set) and len(node.elts) == 1 and isinstance(node.elts[0], ast.Set):
        return f"the reference {{{{{ast.unparse(node.elts[0].elts[0])}}}}} (write its value)"
    if isinstance(node, ast.Attribute):
        return f"attribute access ({ast.unparse(node)})"
    if isinstance(node, ast.UnaryOp):
        return f"the operator {type(node.op).__name__} (only a sign before a number is allowed)"
    if isinstance(node, ast.Constant):
        return f"the constant {node.value!r} of type {type(node.value).__name__}"
    return _CONSTRUCTS.get(type(node), f"a {type(node).__name__} node")


def _where(source: str, node: ast.AST | None) -> str:
    line = getattr(node, "lineno", None)
    return f"{source}:{line}" if line is not None else source


def _refuse(source: str, node: ast.AST, context: str = "") -> ConfigError:
    extra = f" {context}" if context else ""
    return ConfigError(
        f"{_where(source, node)}: {_describe(node)} is not allowed in a config{extra}; only {_ALLOWED} "
        f'(flatten a config that computes its values with MMEngine: Config.fromfile(path).dump("flat.py"))'
    )


def _finite(value: Any, source: str, where: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: {where} is {value!r}; numbers in a config must be finite (no NaN or infinity)")
    return value


class _Evaluator:
    """Turns an expression of allowed constructs into plain Python values; refuses everything else."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.names: dict[str, Any] = {}  # the top-level assignments read so far

    def value(self, node: ast.expr, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise ConfigError(f"{_where(self.source, node)}: the config is nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, ast.Constant):
            value = node.value
            if value is None or isinstance(value, (bool, int, float, str)):
                return _finite(value, _where(self.source, node), "the number")
            raise _refuse(self.source, node)
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, (ast.USub, ast.UAdd)):
                number = self.value(node.operand, depth + 1)
                if isinstance(number, (int, float)) and not isinstance(number, bool):
                    return -number if isinstance(node.op, ast.USub) else number
            raise _refuse(self.source, node)
        if isinstance(node, ast.Name) and node.id in self.names:
            return copy.deepcopy(self.names[node.id])
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
            return self.arithmetic(node, self.value(node.left, depth + 1), self.value(node.right, depth + 1))
        if isinstance(node, ast.List):
            return [self.value(item, depth + 1) for item in node.elts]
        if isinstance(node, ast.Tuple):
            return [self.value(item, depth + 1) for item in node.elts]  # JSON-like: tuples read as lists
        if isinstance(node, ast.Dict):
            result: dict[Any, Any] = {}
            for key, item in zip(node.keys, node.values):
                if key is None:  # {**other}
                    raise ConfigError(f"{_where(self.source, item)}: dict unpacking (**) is not allowed in a config")
                name = self.value(key, depth + 1)
                if not isinstance(name, (str, int)) or isinstance(name, bool):
                    raise ConfigError(
                        f"{_where(self.source, key)}: dict keys must be strings or integers, got {name!r}"
                    )
                result[name] = self.value(item, depth + 1)
            return result
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id == "dict"):
                raise _refuse(self.source, node)
            if node.args:
                raise ConfigError(
                    f"{_where(self.source, node)}: dict(...) takes keyword arguments only in a config "
                    "(write dict(key=value, ...))"
                )
            result = {}
            for keyword in node.keywords:
                if keyword.arg is None:
                    raise ConfigError(
                        f"{_where(self.source, keyword)}: dict(**...) unpacking is not allowed in a config"
                    )
                result[keyword.arg] = self.value(keyword.value, depth + 1)
            return result
        raise _refuse(self.source, node)


    def arithmetic(self, node: ast.BinOp, left: Any, right: Any) -> Any:
        """``left <op> right`` for numbers, ``+`` of two strings or lists, a list times a number; bounded."""
        where = _where(self.source, node)

        def number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        if isinstance(node.op, ast.Mult) and {type(left), type(right)} & {list} and (number(left) or number(right)):
            items, times = (left, right) if isinstance(left, list) else (right, left)
            flat = all(item is None or isinstance(item, (bool, int, float, str)) for item in items)
            if not (flat and isinstance(times, int)) or len(items) * max(times, 0) > MAX_LIST_ITEMS:
                raise ConfigError(
                    f"{where}: a list of numbers or strings may be repeated an integer number of times, to "
                    f"{MAX_LIST_ITEMS} items"
                )
            return items * times
        if isinstance(node.op, ast.Add) and type(left) is type(right) and isinstance(left, (str, list)):
            if len(left) + len(right) > MAX_LIST_ITEMS:
                raise ConfigError(f"{where}: a string or list may be at most {MAX_LIST_ITEMS} long")
            return left + right
        if not (number(left) and number(right)):
            raise ConfigError(
                f"{where}: {type(node.op).__name__} of {type(left).__name__} and {type(right).__name__} is not allowed "
                "in a config; arithmetic takes numbers (and + two strings or lists, a list times a number)"
            )
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ConfigError(f"{where}: a power's exponent must be at most {MAX_EXPONENT} in size, got {right!r}")
        try:
            result = _ARITHMETIC[type(node.op)](left, right)
        except (ZeroDivisionError, OverflowError) as error:
            raise ConfigError(f"{where}: {ast.unparse(node)} fails: {error}") from None
        if isinstance(result, complex):
            raise ConfigError(f"{where}: {ast.unparse(node)} is not a real number")
        return _finite(result, where, "the number")


def parse_python_config(text: str, source: str = "<config>") -> dict[str, Any]:
    """The top-level assignments of an MMDetection-style Python config, read with :mod:`ast` (never executed)."""
    try:
        tree = ast.parse(text, filename=source, mode="exec")
    except SyntaxError as error:
        raise ConfigError(f"{source}:{error.lineno}: invalid Python syntax: {error.msg}") from None
    except (RecursionError, MemoryError, ValueError) as error:
        raise ConfigError(f"{source}: cannot be parsed as a config ({type(error).__name__})") from None
    evaluator = _Evaluator(source)
    # Check every statement before using any of them: a refused construct anywhere refuses the file.
    result: dict[str, Any] = {}
    for statement in tree.body:
        if (
            isinstance(statement, ast.Expr)
            and isinstance(statement.value, ast.Constant)
            and isinstance(statement.value.value, str)
        ):
            continue  # a docstring
        if isinstance(statement, ast.Expr):
            raise _refuse(source, statement.value, "(a config holds assignments only)")
        if not isinstance(statement, ast.Assign):
            raise _refuse(source, statement)
        if len(statement.targets) != 1 or not isinstance(statement.targets[0], ast.Name):
            target = statement.targets[0] if len(statement.targets) == 1 else statement
            raise ConfigError(
                f"{_where(source, statement)}: only `name = value` assignments are allowed in a config, got "
                f"{ast.unparse(target) if isinstance(target, ast.expr) else 'a chained assignment'} as the target"
            )
        try:
            name = statement.targets[0].id
            result[name] = evaluator.names[name] = evaluator.value(statement.value)
        except RecursionError:
            raise ConfigError(f"{_where(source, statement)}: the config is nested too deeply") from None
    return result


def _check_plain(value: Any, source: str, path: str = "", depth: int = 0) -> Any:
    """Validate JSON / TOML data: finite numbers, string keys, bounded depth."""
    if depth > MAX_DEPTH:
        raise ConfigError(f"{source}: the config is nested more than {MAX_DEPTH} levels deep")
    where = path or "the config"
    if isinstance(value, float):
        return _finite(value, source, where)
    if isinstance(value, Mapping):
        return {str(k): _check_plain(v, source, f"{path}.{k}" if path else str(k), depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_check_plain(v, source, f"{path}.{i}", depth + 1) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise ConfigError(f"{source}: {where} has a value of type {type(value).__name__}, which a loss config cannot hold")


def _reject_constant(name: str) -> Any:
    raise ConfigError(f"{name} is not allowed; numbers in a config must be finite")


def parse_json(text: str, source: str = "<json>") -> Any:
    try:
        data = json.loads(text, parse_constant=lambda name: _reject_constant(f"{source}: {name}"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{source}:{error.lineno}: invalid JSON: {error.msg}") from None
    except RecursionError:
        raise ConfigError(f"{source}: the config is nested too deeply") from None
    return _check_plain(data, source)


def parse_toml(text: str, source: str = "<toml>") -> dict[str, Any]:
    if sys.version_info >= (3, 11):  # a version test, not a failed import: mypy checks only the running one's branch
        import tomllib
    else:
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError(f"{source}: reading TOML needs Python 3.11+ or the tomli package") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: invalid TOML: {error}") from None
    return _check_plain(data, source)


def parse_loss_string(text: str, source: str = "--loss") -> dict[str, Any]:
    """One loss config from a string: ``dict(type="FocalLoss", gamma=2.0)``, ``{"type": "FocalLoss"}`` (JSON or a
    Python dict display), or a bare registered name such as ``FocalLoss``."""
    stripped = text.strip()
    if not stripped:
        raise ConfigError(f"{source}: empty loss config")
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", stripped) and stripped != "dict":
        return {"type": stripped}
    if stripped.startswith("{"):
        try:
            value: Any = parse_json(stripped, source)
        except ConfigError as json_error:
            try:
                value = _parse_expression(stripped, source)
            except ConfigError:
                raise json_error from None
    else:
        value = _parse_expression(stripped, source)
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: a loss config must be a dict with a 'type' key, got {type(value).__name__}")
    if "type" not in value:
        raise ConfigError(f"{source}: the loss config {value!r} has no 'type' key")
    return value


def _parse_expression(text: str, source: str) -> Any:
    try:
        tree = ast.parse(text, filename=source, mode="eval")
    except SyntaxError as error:
        raise ConfigError(f"{source}: invalid syntax at column {error.offset}: {error.msg}") from None
    except (RecursionError, MemoryError, ValueError) as error:
        raise ConfigError(f"{source}: cannot be parsed ({type(error).__name__})") from None
    try:
        return _Evaluator(source).value(tree.body)
    except RecursionError:
        raise ConfigError(f"{source}: the config is nested too deeply") from None


# ---------------------------------------------------------------------------------------------------------------
# Files, _base_ and merging


def _read_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size} bytes is too large for a config (limit {MAX_CONFIG_BYTES})")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except OSError as error:
        raise ConfigError(f"cannot read the config {path}: {error.strerror or error}") from None


def parse_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw content of one config file (``_base_`` not followed), chosen by suffix: .py, .json or .toml."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise ConfigError(
            f"{path}: unsupported config type {suffix or '(no suffix)'!r}; use one of {', '.join(CONFIG_SUFFIXES)}"
        )
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" if not path.exists() else f"{path} is not a file")
    text = _read_text(path)
    source = str(path)
    if suffix == ".py":
        data: Any = parse_python_config(text, source)
    elif suffix == ".json":
        data = parse_json(text, source)
    else:
        data = parse_toml(text, source)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level of a config must be a mapping, got {type(data).__name__}")
    return data


def merge(base: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """MMEngine's merge: ``child`` overrides ``base``, dicts merge recursively, ``_delete_=True`` replaces."""
    result = dict(base)
    for key, value in child.items():
        if isinstance(value, Mapping) and not value.get(DELETE_KEY, False) and isinstance(result.get(key), Mapping):
            result[key] = merge(result[key], value)
        else:
            result[key] = value
    return result


def _strip_delete(value: Any, source: str, path: str = "") -> Any:
    if isinstance(value, Mapping):
        flag = value.get(DELETE_KEY, False)
        if not isinstance(flag, bool):
            raise ConfigError(f"{source}: {path or 'the config'}.{DELETE_KEY} must be True or False, got {flag!r}")
        return {
            k: _strip_delete(v, source, f"{path}.{k}" if path else str(k)) for k, v in value.items() if k != DELETE_KEY
        }
    if isinstance(value, list):
        return [_strip_delete(v, source, f"{path}.{i}") for i, v in enumerate(value)]
    return value


def _base_paths(data: Mapping[str, Any], path: Path) -> list[str]:
    bases = data.get(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: {BASE_KEY} must be a file path or a list of file paths, got {bases!r}")
    return bases


def _load(path: Path, root: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    data = parse_file(path)
    merged: dict[str, Any] = {}
    owners: dict[str, Path] = {}
    for base in _base_paths(data, path):
        if "{{" in base or "$" in base:
            raise ConfigError(f"{path}: {BASE_KEY} entry {base!r}: variables in paths are not supported")
        resolved = (path.parent / base).resolve()
        if not resolved.is_relative_to(root):
            raise ConfigError(
                f"{path}: {BASE_KEY} entry {base!r} resolves to {resolved}, outside the config's directory {root}; "
                "base files are followed only inside the directory tree of the config that was opened (or of its "
                f"parent, when that holds a {BASE_KEY} folder)"
            )
        if resolved in chain:
            cycle = " -> ".join(str(p) for p in (*chain, resolved))
            raise ConfigError(f"{path}: {BASE_KEY} files include each other: {cycle}")
        loaded = _load(resolved, root, (*chain, resolved))
        for key in loaded:
            if key in owners:
                raise ConfigError(
                    f"{path}: the key {key!r} is defined in both bases {owners[key]} and {resolved}; "
                    "MMEngine does not allow duplicate keys among bases"
                )
            owners[key] = resolved
        merged.update(loaded)
    own = {k: v for k, v in data.items() if k != BASE_KEY}
    return merge(merged, own)


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A whole config file, ``_base_`` files followed (inside its directory tree) and merged, never executed."""
    given = Path(path)
    if not given.exists():
        raise ConfigError(f"config file {given} does not exist")
    resolved = given.resolve()
    root = resolved.parent
    if (root.parent / BASE_KEY).is_dir():  # MMDetection's configs/<model>/x.py with ../_base_/...
        root = root.parent
    data = _load(resolved, root, (resolved,))
    return _strip_delete(data, str(given))


def is_loss_key(key: object) -> bool:
    """``loss_cls``, ``loss_bbox``, ... and prefixed forms such as ``initial_loss_cls``."""
    return isinstance(key, str) and (key.startswith("loss_") or "_loss_" in key)


def collect_losses(cfg: Any, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Every ``loss_*`` dict at any depth, keyed by its dotted path (list positions as numbers).

    Raises:
        ConfigError: a ``loss_*`` entry that is a dict without a ``type`` but with a loss's arguments
            (``loss_cls=dict(gamma=2.0)``); one without either (``loss_weights=dict(cls=1.0)``) is not a loss.
    """
    from .registry import MODELS, config_parameters

    loss_arguments = {name for cls in MODELS.module_dict.values() for name in config_parameters(cls)}
    found: dict[str, dict[str, Any]] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                child = f"{path}.{key}" if path else str(key)
                if is_loss_key(key) and isinstance(item, Mapping) and ("type" in item or loss_arguments & set(item)):
                    if "type" not in item:
                        raise ConfigError(f"the loss entry {child} has no 'type': {dict(item)!r}")
                    found[child] = dict(item)
                else:
                    walk(item, child)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, f"{path}.{index}" if path else str(index))

    walk(cfg, prefix)
    return found


def losses_from_file(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The loss configs of a config file by dotted path; a file without any ``loss_*`` entry is an error."""
    losses = collect_losses(load_config(path))
    if not losses:
        raise ConfigError(f"{path}: no loss_* entries found (expected e.g. loss_cls = dict(type=...))")
    return losses


__all__ = [
    "CONFIG_SUFFIXES",
    "collect_losses",
    "is_loss_key",
    "load_config",
    "losses_from_file",
    "merge",
    "parse_file",
    "parse_json",
    "parse_loss_string",
    "parse_python_config",
    "parse_toml",
]
