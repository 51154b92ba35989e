"""A command's options, generated from its config dataclass: one source for names, defaults and help.

Every field of the config becomes one option: ``--field-name`` (or the ``flag`` its ``opt()``
declares, e.g. ``--format`` for ``prompt_format``), or a positional argument when it is declared
``positional``. Booleans are ``--x/--no-x`` flags, lists are repeatable options (one item each,
taken as written). Each command also takes ``--config FILE.yaml`` and positional ``key=value``
overrides, and, when it prints a JSON result, ``--json``.

Precedence, lowest first: the dataclass defaults < ``--config`` YAML < ``key=value`` < options
given on the command line. Every value goes through :func:`synthtune.config.load_config`, so an
option is checked exactly like the same key in a YAML file (type, choices, range) and an error
names the option.

Only ``cli.py`` imports this module (it needs typer); the library never does.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from synthtune.config import check_required, flag_of, load_config, override_text

#: the command function's own parameters; no config field may take these names
CONFIG, OVERRIDES, JSON = "st_config_file", "st_overrides", "st_json"

CONFIG_HELP = ("YAML file with any of the fields below (field_name: value); precedence: defaults < this file "
               "< key=value < options")
OVERRIDES_HELP = ("overrides as field_name=value: any option below, by its field name (lists as a,b or [a, b]; "
                  "null for none)")
JSON_HELP = "print only the JSON result on stdout (no progress or human summary on stderr)"

_KW = inspect.Parameter.KEYWORD_ONLY


def _value_type(tp: Any) -> Any:
    """``int`` for ``int | None``: the type a set value has."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _default(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]


def _metavar(f: Field, tp: Any) -> str:
    if f.metadata.get("metavar"):
        return f.metadata["metavar"]
    if f.metadata.get("choices"):
        return "[" + "|".join(map(str, f.metadata["choices"])) + "]"
    if typing.get_origin(tp) is list:
        return "TEXT..."
    return {int: "INTEGER", float: "FLOAT"}.get(tp, "TEXT")


def _help(f: Field) -> str:
    # typer renders help as rich markup: escaped, "[a, b]" stays text instead of becoming a style tag
    return escape(f.metadata.get("help", ""))


def option_parameter(f: Field, tp: Any) -> inspect.Parameter:
    """The typer parameter for field ``f`` of type ``tp``; its default is shown, never applied."""
    tp = _value_type(tp)
    default = _default(f)
    if f.metadata.get("positional"):
        info = typer.Argument(help=_help(f), metavar=_metavar(f, tp), show_default=False)
        return inspect.Parameter(f.name, _KW, default=None, annotation=Annotated[str | None, info])
    flag = flag_of(f)
    if tp is bool:
        info = typer.Option(f"{flag}/--no-{flag[2:]}", help=_help(f), show_default=True)
        return inspect.Parameter(f.name, _KW, default=default, annotation=Annotated[bool | None, info])
    if typing.get_origin(tp) is list:
        info = typer.Option(flag, help=_help(f), metavar=_metavar(f, tp), show_default=bool(default))
        return inspect.Parameter(f.name, _KW, default=list(default) or None,
                                 annotation=Annotated[list[str] | None, info])
    shown = None if default is None else override_text(tp, default)
    info = typer.Option(flag, help=_help(f), metavar=_metavar(f, tp), show_default=shown is not None)
    return inspect.Parameter(f.name, _KW, default=shown, annotation=Annotated[str | None, info])


def command_parameters(cls: type, json_switch: bool) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(cls)
    clash = {f.name for f in fields(cls)} & {CONFIG, OVERRIDES, JSON, "ctx"}
    if clash:
        raise TypeError(f"{cls.__name__}: field names {sorted(clash)} are taken by the command line")
    positional = [f for f in fields(cls) if f.metadata.get("positional")]
    options = [f for f in fields(cls) if not f.metadata.get("positional")]
    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    params += [option_parameter(f, hints[f.name]) for f in positional]
    params.append(inspect.Parameter(OVERRIDES, _KW, default=None, annotation=Annotated[list[str] | None, typer.Argument(
        help=escape(OVERRIDES_HELP), metavar="KEY=VALUE", show_default=False)]))
    params.append(inspect.Parameter(CONFIG, _KW, default=None, annotation=Annotated[Path | None, typer.Option(
        "--config", help=escape(CONFIG_HELP), metavar="FILE.yaml", show_default=False)]))
    params += [option_parameter(f, hints[f.name]) for f in options]
    if json_switch:
        params.append(inspect.Parameter(JSON, _KW, default=False, annotation=Annotated[bool, typer.Option(
            "--json", help=escape(JSON_HELP))]))
    return params


def parse(cls: type, ctx: typer.Context, values: dict[str, Any]):
    """The config from the parsed command line: defaults < --config < key=value < given options."""
    given = {}
    names = {}
    overrides = list(values[OVERRIDES] or [])
    by_name = {f.name for f in fields(cls)}
    for f in fields(cls):
        source = ctx.get_parameter_source(f.name)
        if source is None or source.name != "COMMANDLINE":  # typer vendors its own click: by name
            continue
        value = values[f.name]
        if f.metadata.get("positional") and value.partition("=")[0] in by_name:
            # click fills the argument with the first word; that word was an override. The argument is
            # the first word that is none (``score out=o.jsonl in.jsonl``), or it comes from key=value/--config.
            overrides.insert(0, value)
            bare = next((o for o in overrides if o.partition("=")[0] not in by_name), None)
            if bare is None:
                continue
            overrides.remove(bare)
            value = bare
        if isinstance(value, list) and f.metadata.get("split"):
            value = [part.strip() for item in value for part in item.split(f.metadata["split"]) if part.strip()]
        given[f.name] = value
        names[f.name] = f"{'argument' if f.metadata.get('positional') else 'option'} {flag_of(f)}"
    cfg = load_config(cls, values[CONFIG], overrides, option_names=names, **given)
    check_required(cfg)
    return cfg


def parse_argv(group, argv: list[str]) -> tuple[Any, bool]:
    """The config (and ``--json``) that ``synthtune ARGV`` would run with, without running it.

    ``group`` is the click group of the app (``typer.main.get_command(app)``). For tests and tools.
    """
    cmd, args = group, list(argv)
    while hasattr(cmd, "commands"):
        name = args.pop(0)
        cmd = cmd.commands[name]
    ctx = cmd.make_context(name, args)
    return parse(cmd.callback.config_class, ctx, ctx.params), bool(ctx.params.get(JSON))


def config_command(app: typer.Typer, name: str, cls: type, *, json_switch: bool = False,
                   help: str | None = None) -> Callable:
    """Register ``handler(cfg)`` (``handler(cfg, json_only)`` with ``json_switch``) as command ``name``.

    The command's help is ``help``, else the handler's docstring, else the config class's.
    """

    def decorate(handler: Callable) -> Callable:
        def command(ctx: typer.Context, **values: Any) -> Any:
            cfg = parse(cls, ctx, values)
            return handler(cfg, values[JSON]) if json_switch else handler(cfg)

        params = command_parameters(cls, json_switch)
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__doc__ = help or handler.__doc__ or inspect.getdoc(cls)
        command.__name__ = handler.__name__
        command.config_class = cls  # type: ignore[attr-defined]
        app.command(name)(command)
        return handler

    return decorate
