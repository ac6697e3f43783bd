"""One config system for every verb and config file: typed signatures and dataclasses, parsed by jsonargparse.

A verb's flags, defaults, `--help`, its YAML file and its dotted overrides all come from one typed function
signature (and the dataclasses it takes), so nothing is declared twice and nothing can drift:

- a plain parameter is one dash-separated flag (`tile_size` -> `--tile-size`; a bool `progress` ->
  `--progress` / `--no-progress`); its help is the parameter's line in the docstring's ``Args:``;
- a dataclass parameter is spread into one flag per field (help from the class's ``Attributes:``), and a
  dataclass with sections (fields that are dataclasses) keeps its YAML keys as dotted flags
  (`--training.learning_rate`), the way the YAML file nests them;
- a YAML file (`--config`) holds the same keys; flags given after it override it.

Errors say where the bad key or value came from (the file or the flag) and list the valid keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

import docstring_parser
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, DefaultHelpFormatter, Namespace

__all__ = ["ConfigError", "SignatureParser", "dotted_flags", "new_parser", "parse_or_raise"]


class ConfigError(ValueError):
    """A config file, flag or override that cannot be used; names the file or the flag, and the valid keys."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help (type and default beside every flag) with the docstring's paragraphs kept."""


def new_parser(prog: str, description: str | None = None) -> ArgumentParser:
    """A parser that raises instead of exiting, and never accepts abbreviated flags (a typo stays a typo)."""
    return ArgumentParser(prog=prog, description=description, exit_on_error=False, allow_abbrev=False,
                          formatter_class=_HelpFormatter)


def docstring_parts(obj: Any) -> tuple[str, dict[str, str]]:
    """(description without the Args/Returns sections, {parameter or attribute: its help line})."""
    doc = docstring_parser.parse(inspect.getdoc(obj) or "")
    text = "\n\n".join(p for p in (doc.short_description, doc.long_description) if p)
    return text, {p.arg_name: " ".join(p.description.split()) for p in doc.params if p.description}


def _is_dataclass_type(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _has_sections(cls: type) -> bool:
    return any(_is_dataclass_type(h) for h in typing.get_type_hints(cls).values())


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class SignatureParser:
    """Adds a typed callable's parameters to a parser, then calls it with the parsed values.

    Args:
        fn: a typed function (its parameters become flags; `Args:` in its docstring the help).
        positionals: parameters taken by position instead of by flag (a list parameter takes one or more).
        config_file: add `--config FILE`, a YAML of the same keys that the flags after it override.
    """

    def __init__(self, fn: Callable[..., Any], positionals: Sequence[str] = (), config_file: bool = False) -> None:
        self.fn = fn
        self.positionals = tuple(positionals)
        self.config_file = config_file
        self.description, self._help = docstring_parts(fn)
        self._hints = typing.get_type_hints(fn)
        self._params = dict(inspect.signature(fn).parameters)
        self._required: dict[str, str] = {}  # key -> flag, checked after parsing (a YAML may set it)
        self._spread: dict[str, type] = {}  # parameter -> dataclass whose fields are flags
        self._sections: dict[str, type] = {}  # parameter -> dataclass with sections (dotted flags)

    def add_to(self, parser: ArgumentParser) -> ArgumentParser:
        """Declare the flags (and `--config`) on `parser`; returns it."""
        if self.config_file:
            parser.add_argument("--config", action=ActionConfigFile,
                                help="YAML file of these settings (keys as below, underscores); later flags override it")
        for name, param in self._params.items():
            hint = self._hints.get(name, Any)
            if _is_dataclass_type(hint) and _has_sections(hint):
                parser.add_class_arguments(hint, nested_key=None, fail_untyped=False)
                self._sections[name] = hint
            elif _is_dataclass_type(hint):
                _, field_help = docstring_parts(hint)
                cls_hints = typing.get_type_hints(hint)
                for f in dataclasses.fields(hint):
                    if not f.init:
                        continue
                    default = f.default if f.default is not dataclasses.MISSING else (
                        f.default_factory() if f.default_factory is not dataclasses.MISSING else inspect.Parameter.empty)
                    self._add(parser, f.name, cls_hints[f.name], default, field_help.get(f.name, ""))
                self._spread[name] = hint
            else:
                self._add(parser, name, hint, param.default, self._help.get(name, ""))
        return parser

    def _add(self, parser: ArgumentParser, name: str, hint: Any, default: Any, help_text: str) -> None:
        if name in self.positionals:
            many = typing.get_origin(hint) is list
            item = typing.get_args(hint)[0] if many else hint
            parser.add_argument(name, metavar=name.upper(), nargs="+" if many else None, type=item, help=help_text)
            return
        required = default is inspect.Parameter.empty
        if hint is bool:
            parser.add_argument(_flag(name), action=ActionYesNo(no_prefix="no-"), default=bool(default),
                                help=help_text)
        elif required:
            self._required[name] = _flag(name)
            parser.add_argument(_flag(name), type=typing.Optional[hint], default=None,  # noqa: UP045  (hint may be any form)
                                help=f"{help_text} (required)".strip())
        elif _repeatable(hint):  # `--ask "a question" --ask "another"`: one value per flag, plain text
            parser.add_argument(_flag(name), action="append", type=str, default=default, metavar=name.upper(),
                                help=f"{help_text} (repeatable)".strip())
        else:
            parser.add_argument(_flag(name), type=hint, default=default, help=help_text)

    def call(self, values: Namespace, parser: ArgumentParser) -> Any:
        """Call the function with parsed `values`; builds the dataclasses (their checks may raise ValueError).

        Raises:
            ConfigError: a required setting is missing from both the flags and the `--config` file.
        """
        flat = values.clone()
        for key, flag in self._required.items():
            if flat.get(key) is None:
                where = f" (or set {key} in the --config file)" if self.config_file else ""
                raise ConfigError(f"{flag} is required{where}")
        kwargs: dict[str, Any] = {}
        for name in self._params:
            if name in self._spread:
                cls = self._spread[name]
                kwargs[name] = cls(**{f.name: flat[f.name] for f in dataclasses.fields(cls) if f.init})
            elif name in self._sections:
                kwargs[name] = build_sectioned(self._sections[name], flat, parser)
            else:
                kwargs[name] = flat[name]
        return self.fn(**kwargs)


def build_sectioned(cls: type, values: Namespace, parser: ArgumentParser) -> Any:
    """A dataclass with sections from parsed dotted values; its own checks (`__post_init__`) run here."""
    keep = {f.name for f in dataclasses.fields(cls)}
    sub = Namespace({k: v for k, v in vars(values).items() if k in keep})
    built = parser.instantiate(sub) if hasattr(parser, "instantiate") else parser.instantiate_classes(sub)
    return cls(**{name: built[name] for name in keep})


def _repeatable(hint: Any) -> bool:
    """`list[str]` or `list[str] | None`: a flag given once per item (text is never parsed as YAML)."""
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(hint) if a is not type(None)] if is_union else [hint]
    return len(args) == 1 and typing.get_origin(args[0]) is list and typing.get_args(args[0]) == (str,)


def dotted_flags(overrides: Sequence[str] | dict[str, Any] | None) -> list[str]:
    """Overrides as flags: a ``{"training.learning_rate": 1e-4}`` mapping, or flags already (kept as they are)."""
    if overrides is None:
        return []
    if isinstance(overrides, dict):
        out: list[str] = []
        for key, value in overrides.items():
            # JSON is YAML, so jsonargparse reads numbers, lists, mappings and null from it; strings go
            # as they are (a JSON-quoted string would keep its quotes in a str field)
            out += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
        return out
    return [str(t) for t in overrides]


# ------------------------------------------------------------------------------------------- errors

_UNKNOWN = (
    re.compile(r"Group '(?P<section>[^']+)' does not accept option '(?P<leaf>[^']+)'"),
    re.compile(r"Option '(?P<key>[^']+)' is not accepted"),
    re.compile(r"[Uu]nrecognized arguments: (?P<flags>.+)"),
    re.compile(r"Key \"(?P<key>[^\"]+)\" is not expected"),
)
_BAD_VALUE = re.compile(r"Parser key \"(?P<key>[^\"]+)\":(?P<rest>.*)", re.S)


def _valid_keys(parser: ArgumentParser, section: str) -> list[str]:
    """The keys a section accepts (top level: flags of flat verbs, section names of sectioned configs)."""
    positional = {a.dest for a in parser._actions if not a.option_strings}
    keys = [k for k in parser.get_defaults().keys()  # noqa: SIM118  (a Namespace: dotted keys)
            if k not in ("config", "print_config", "help") and k not in positional]
    if section:
        return sorted(k[len(section) + 1:] for k in keys if k.startswith(section + "."))
    return sorted({k.split(".")[0] for k in keys})


def _origin(key: str, argv: Sequence[str], config_files: Sequence[str]) -> str:
    flag_forms = {f"--{key}", _flag(key), f"--no-{key.replace('_', '-')}"}
    if any(t.split("=", 1)[0] in flag_forms for t in argv if t.startswith("--")) or not config_files:
        return f"flag {_flag(key) if '.' not in key else '--' + key}"
    return f"file {', '.join(config_files)}"


def _type_name(hint: Any) -> str:
    """`float | null`, `int`, `one of ['native', 'error']`: how a YAML or flag value must look."""
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return f"one of {list(typing.get_args(hint))}"
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _unknown_key(parser: ArgumentParser, key: str, origin: str) -> str:
    sectioned = any("." in k for k in parser.get_defaults().keys())  # noqa: SIM118
    section = key.rsplit(".", 1)[0] if "." in key else ""
    valid = _valid_keys(parser, section)
    if section and not valid:  # the section itself is unknown
        key, section, valid = key.split(".")[0], "", _valid_keys(parser, "")
    shown = ", ".join(valid if sectioned or origin.startswith("file") else [_flag(k) for k in valid])
    where = f" in {section!r}" if section else ""
    return f"{origin}: unknown key {key!r} (valid{where}: {shown})"


def explain(error: Exception, parser: ArgumentParser, argv: Sequence[str]) -> str:
    """One readable line for a jsonargparse error: what is wrong, where it came from, and the valid keys."""
    message = str(error)
    config_files = [argv[i + 1] for i, t in enumerate(argv[:-1]) if t == "--config"]
    config_files += [t.split("=", 1)[1] for t in argv if t.startswith("--config=")]
    if message.startswith(("Problems parsing config", "Unexpected config")):  # a YAML that does not parse
        files = config_files or [t for t in argv if not t.startswith("-") and t.endswith((".yaml", ".yml"))]
        return f"{', '.join(files) or 'config'}: not a valid config: {' '.join(message.split())}"
    for pattern in _UNKNOWN:
        m = pattern.search(message)
        if not m:
            continue
        groups = m.groupdict()
        if groups.get("flags"):
            key = groups["flags"].split()[0].lstrip("-").split("=", 1)[0]
            return _unknown_key(parser, key, f"flag --{key}")
        key = groups.get("key") or f"{groups['section']}.{groups['leaf']}"
        return _unknown_key(parser, key, _origin(key, argv, config_files))
    m = _BAD_VALUE.search(message)
    if m:
        key = m["key"]
        if key == "config":
            return f"--config: {' '.join(m['rest'].split())}"
        action = next((a for a in parser._actions if a.dest == key), None)
        hint = getattr(action, "_typehint", None)
        given = re.search(r"(?:Given|Got) value: (.*)", m["rest"])
        expected = f"expected {_type_name(hint)}" if hint is not None else " ".join(m["rest"].split())
        got = f", got {given[1].strip()!r}" if given else ""
        return f"{_origin(key, argv, config_files)}: invalid value for {key}: {expected}{got}"
    return " ".join(message.split())


def parse_or_raise(parser: ArgumentParser, argv: Sequence[str]) -> Namespace:
    """Parse `argv`; a bad key or value raises ConfigError naming the file or flag (`--help` still exits 0).

    Raises:
        ConfigError: unknown key, invalid value, missing config file.
    """
    try:
        return parser.parse_args(list(argv))
    except argparse.ArgumentError as e:
        raise ConfigError(explain(e, parser, argv)) from e
