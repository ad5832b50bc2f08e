"""The command line from config dataclasses: every field becomes `--field-name`, the preset gives the defaults."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing
from dataclasses import fields
from pathlib import Path


class ClearError(RuntimeError):
    """An error whose message says all the user needs: the scripts print it as one `error: ...` line (exit 1)."""


class ConfigError(ValueError):
    """A config read from a file does not fit the dataclass it should rebuild."""


class _ExplicitNone:
    """`--field none` on an Optional field: argparse's None already means "not passed"."""


_EXPLICIT_NONE = _ExplicitNone()


def _field_type(cls, f: dataclasses.Field):
    return typing.get_type_hints(cls)[f.name]


def _is_union(tp) -> bool:
    origin = typing.get_origin(tp)
    return origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>")


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def finite_float(text: str) -> float:
    """A float that is a real number: NaN and infinities are refused where they are typed, not steps later."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _parser_for(tp):
    """(argparse type, nargs) for a dataclass field type."""
    if _is_union(tp):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        base_type, nargs = _parser_for(inner[0])

        def maybe_none(text, _base=base_type):
            return _EXPLICIT_NONE if text.lower() == "none" else _base(text)

        return maybe_none, nargs
    if typing.get_origin(tp) is tuple:
        return _parser_for(typing.get_args(tp)[0])[0], "+"
    if tp is bool:
        return parse_bool, None
    if tp is float:
        return finite_float, None
    return tp, None


class _Default(str):
    """A string default, marked as such: `--resume` refuses a typed --data/--preset that differs from the run's,
    which it can only do when it can tell a typed value from a default (see `given`)."""


RUN_SOURCES = ("data", "data_root", "preset")  # where a run's data and setup come from: fixed once it started


def given(args: argparse.Namespace, name: str) -> bool:
    """Whether the user typed the option `name` (not a default it got from the parser)."""
    value = getattr(args, name, None)
    return value is not None and not isinstance(value, _Default)


def add_run_args(parser: argparse.ArgumentParser, what: str) -> None:
    """The options every training script has: --out, --resume, --skip-nonfinite, --cpu.

    String defaults of --data, --data-root and --preset, when the parser already has them, are marked (see `given`)."""
    for name in RUN_SOURCES:
        default = parser.get_default(name)
        if isinstance(default, str):
            parser.set_defaults(**{name: _Default(default)})
    parser.add_argument("--out", required=True, help=f"run folder ({what})")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue the run in --out from its latest intact checkpoint, or from a given one")
    parser.add_argument("--skip-nonfinite", action="store_true",
                        help="skip (and count) steps whose loss is NaN/inf instead of stopping the run")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")


def add_config_args(parser: argparse.ArgumentParser, *config_classes) -> None:
    """Expose every field of the given config dataclasses as `--field-name` (default: the preset's value)."""
    for cls in config_classes:
        group = parser.add_argument_group(f"{cls.__name__} (overrides the preset)")
        for f in fields(cls):
            tp = _field_type(cls, f)
            arg_type, nargs = _parser_for(tp)
            flag = "--" + f.name.replace("_", "-")
            extra = {"nargs": "?", "const": True} if tp is bool else {"nargs": nargs}  # `--flag` alone = true
            group.add_argument(flag, dest=f.name, type=arg_type, default=None, **extra)


def explicit_overrides(config_classes, args: argparse.Namespace) -> dict:
    """The config fields the user passed on the command line, as the dataclass would hold them."""
    out = {}
    for cls in config_classes:
        for f in fields(cls):
            value = getattr(args, f.name, None)
            if value is None:
                continue
            if value is _EXPLICIT_NONE:
                value = None
            elif isinstance(value, list):
                value = tuple(value)
            out[f.name] = value
    return out


def apply_overrides(config, args: argparse.Namespace):
    """Copy of `config` with every field the user passed on the command line replaced."""
    return dataclasses.replace(config, **explicit_overrides([type(config)], args))


def _fits(tp, value) -> bool:
    """Whether a JSON value fits a config field's type (ints for float fields too; floats must be finite)."""
    if tp is type(None):
        return value is None
    if _is_union(tp):
        return any(_fits(arg, value) for arg in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(args[0], v) for v in value)
        return len(value) == len(args) and all(_fits(a, v) for a, v in zip(args, value))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    return True


def _type_name(tp) -> str:
    """What a field expects, with its article: 'an integer', 'a list of 2 finite numbers'."""
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        each = _type_name(args[0])
        return f"a list (each {each})" if len(args) == 2 and args[1] is Ellipsis else \
            f"a list of {len(args)} values (each {each})"
    return {type(None): "null", float: "a finite number", int: "an integer", bool: "true or false",
            str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def config_from_dict(cls, data: dict):
    """Rebuild a config dataclass from its JSON dict (lists become tuples); unknown or malformed keys are an error."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a JSON object for {cls.__name__}, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config has fields {unknown} that {cls.__name__} does not know: "
                          "the run was written by a newer or different version of this toolkit")
    for f in fields(cls):
        if f.name in data and not _fits(_field_type(cls, f), data[f.name]):
            raise ConfigError(f"{cls.__name__}.{f.name} = {data[f.name]!r} is not "
                              f"{_type_name(_field_type(cls, f))}: the file was edited or damaged")
    values = {name: tuple(value) if isinstance(value, list) else value for name, value in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:  # a hand-edited value of the wrong type or out of range
        raise ConfigError(f"{cls.__name__}: {err}") from err


def format_config(title: str, config) -> str:
    """A config dataclass as `name = value` lines for the start-of-run printout."""
    rows = [f"{f.name} = {getattr(config, f.name)!r}" for f in fields(config)]
    return title + ":\n" + "\n".join("  " + r for r in rows)


def check_out_path(path, flag: str = "--out") -> None:
    """Refuse an output folder that is an existing file, or lies under one, before any work starts."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                fail(f"{flag} {path}: {part} is a file, not a folder: choose a folder path for {flag}" if part == path
                     else f"{flag} {path}: {part} is a file, so no folder can be made under it")
            return


def fail(message: str, code: int = 2) -> typing.NoReturn:
    """Print an actionable error and exit (for problems found before any work starts)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def exit_on_clear_error(main, argv=None) -> None:
    """A script's entry point: `main(argv)`, with a ClearError (a non-finite loss, a full disk) reported as one
    line and exit status 1 instead of a traceback."""
    try:
        main(argv)
    except ClearError as err:
        raise SystemExit(f"error: {err}")
