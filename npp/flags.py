"""Command-line flags from config dataclasses: one generator and one spelling for every `npp` command.

Each field becomes `--field-name` (underscores are accepted too, for scripts written that way), with
its docstring as the help; a nested dataclass field becomes `--parent.field-name` (`--schedule.levels`)
unless it is flattened into its parent (the sampler of `npp evaluate`: `--cfg-scale`). Values parse as
the field's type: numbers, strings, `true`/`false` (or a bare `--flag` / `--no-flag`) for booleans,
several values for tuples and lists, a JSON object for dicts. Flags default to "not given", so that
they override a `--config` file field by field; the dataclass then validates the whole.

Errors are one line on stderr and exit code 2, the same as every other bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from typing import Any, Iterable, NoReturn

from npp.errors import USER_ERRORS, ConfigError


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `prog: error: message`, exit code 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(prog: str, err: BaseException) -> int:
    """Print a user error as one line; return the exit code (2)."""
    print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
    return 2


def run_command(prog: str, body) -> int:
    """Run body() and turn every user error (bad config, checkpoint, data, missing extra) and every file the
    system refused (a folder one cannot write to, a full disk) into one line."""
    try:
        return body() or 0
    except USER_ERRORS as err:
        return fail(prog, err)
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        return fail(prog, OSError(f"{where}{err.strerror or err}: choose another path, or make room or permission there"))


# ------------------------------------------------------------------------------------------------
# Field docs
# ------------------------------------------------------------------------------------------------

def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass and of its bases (Python keeps none of them
    at run time), so that command-line help and app labels say what the code says."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):  # defined where no source exists (an interactive session)
            continue
        docs.update({node.target.id: " ".join(doc.value.value.split()) for node, doc in zip(body, body[1:])
                     if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                     and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                     and isinstance(doc.value.value, str)})
    return docs


def default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


# ------------------------------------------------------------------------------------------------
# Value parsers
# ------------------------------------------------------------------------------------------------

def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean: use true or false")


def parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def parse_json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON: give an object such as "
                                         f"'{{\"resid_dropout\": 0.0}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is a JSON {type(value).__name__}, not an object: give "
                                         f"field names and values such as '{{\"resid_dropout\": 0.0}}'")
    return value


_SCALARS = {int: parse_int, float: parse_float, str: str, bool: parse_bool}


def _argument_options(kind: Any) -> dict[str, Any]:
    """argparse options (type, nargs) for a field's type hint."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _argument_options(inner[0])
    if kind is bool:
        return {"type": parse_bool, "nargs": "?", "const": True, "metavar": "true|false"}
    if kind in _SCALARS:
        return {"type": _SCALARS[kind], "metavar": kind.__name__.upper()}
    if origin in (tuple, list):
        element = args[0] if args else str
        return {"type": _SCALARS.get(element, str), "nargs": "+", "metavar": "X"}
    if origin is dict or kind is dict:
        return {"type": parse_json_object, "metavar": "JSON"}
    return {"type": str, "metavar": "V"}


# ------------------------------------------------------------------------------------------------
# Building the parser and reading it back
# ------------------------------------------------------------------------------------------------

def _dest(prefix: str, name: str) -> str:
    return f"{prefix}{name}"


def add_flags(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "", flatten: Iterable[str] = (),
              exclude: Iterable[str] = (), defaults: Any = None) -> None:
    """A flag per field of the dataclass `cls` (recursively for nested dataclasses).

    `flatten` names nested fields whose own fields take no prefix; `exclude` names fields that get no
    flag; `defaults` (an instance) supplies the defaults shown in the help.
    """
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    flatten, exclude = set(flatten), set(exclude)
    group = parser.add_argument_group(cls.__name__) if not prefix else parser
    for field in dataclasses.fields(cls):
        if field.name in exclude or not field.init:
            continue
        kind = hints[field.name]
        default = getattr(defaults, field.name) if defaults is not None else default_of(field)
        if dataclasses.is_dataclass(kind):
            nested_prefix = prefix if field.name in flatten else f"{prefix}{field.name}."
            add_flags(parser, kind, prefix=nested_prefix, defaults=default)
            continue
        dest = _dest(prefix, field.name)
        kebab, snake = f"--{prefix}{field.name.replace('_', '-')}", f"--{prefix}{field.name}"
        shown = json.dumps(list(default) if isinstance(default, tuple) else default, ensure_ascii=False)
        negation = f"--{prefix}no-{field.name.replace('_', '-')}"
        shown += f"; {negation} for false" if kind is bool else ""
        help_text = f"{docs.get(field.name, '')} (default: {shown})".replace("%", "%%")
        options = _argument_options(kind)
        group.add_argument(kebab, dest=dest, default=None, help=help_text, **options)
        if snake != kebab:
            group.add_argument(snake, dest=dest, default=None, help=argparse.SUPPRESS, **options)
        if kind is bool:
            group.add_argument(negation, dest=dest, action="store_const",
                               const=False, default=None, help=argparse.SUPPRESS)


def given(args: argparse.Namespace, cls: type, *, prefix: str = "", flatten: Iterable[str] = (),
          exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The values of the flags that were given, nested like the dataclass (a dict for from_dict)."""
    hints = typing.get_type_hints(cls)
    flatten, exclude = set(flatten), set(exclude)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name in exclude or not field.init:
            continue
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            nested_prefix = prefix if field.name in flatten else f"{prefix}{field.name}."
            nested = given(args, kind, prefix=nested_prefix)
            if nested:
                values[field.name] = nested
            continue
        value = getattr(args, _dest(prefix, field.name), None)
        if value is not None:
            values[field.name] = value
    return values


def overlay(cls: type, base: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """base (a config file's fields) with the given flags on top: a flag replaces one field, also inside a
    nested config (`--schedule.levels 3` keeps the file's other schedule fields)."""
    hints = typing.get_type_hints(cls)
    out = dict(base)
    for key, value in flags.items():
        nested = hints.get(key)
        # Only an object merges into an object: anything else replaces it, and the dataclass then says
        # in one line that it is not an object of fields.
        if dataclasses.is_dataclass(nested) and isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = overlay(nested, out[key], value)
        else:
            out[key] = value
    return out


def read_config_file(path: str, cls: type) -> dict[str, Any]:
    """The fields of a `--config` JSON file for the dataclass `cls`, or a one-line ConfigError: a missing file,
    one that is not UTF-8 JSON, not an object, or whose nested sections (`"schedule": 5`) are not objects."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config {path} is not UTF-8 text (at byte offset {err.start}): save it as UTF-8 "
                          f"JSON") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"--config {path} is not valid JSON ({err}): fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} holds a JSON {type(data).__name__}, not an object of "
                          f"{cls.__name__} fields")
    check_sections(cls, data, f"--config {path}")
    return data


def check_sections(cls: type, data: dict[str, Any], where: str) -> None:
    """Every field of `data` that is a nested dataclass of `cls` (schedule, eval_sampler) holds an object."""
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        nested = hints.get(key)
        if dataclasses.is_dataclass(nested) and not isinstance(value, dict):
            raise ConfigError(f"{where}: {key!r} is a JSON {type(value).__name__} ({json.dumps(value)[:40]}), not "
                              f"an object of {nested.__name__} fields: write it as {{\"field\": value, ...}}")
