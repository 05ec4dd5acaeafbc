"""Command-line flags made from the fields of a configuration model.

Each field of the model becomes one option: ``--field-name``, with the
field's description as help and the field's default shown. A ``Literal``
or registry names (:class:`~mf_dist.settings.Registered`) become choices,
a boolean becomes a ``--name/--no-name`` pair, and a table with a kind (the
run's ``cluster``) becomes a flag that picks the kind; the table's other
settings are left to the config file (see :func:`mf_dist.config.table_kind`).
A field of any other type, or one without a description, is an error when
the command is built, so a new setting cannot go without its flag and help.

The decorated command receives ``flags``: the flags the user gave, by field
name. Flags left out are not in it, so they never replace the config file's
value (or the model's default).
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal, Optional, TypeVar, Union, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from rich.markup import escape

from mf_dist.config import table_kind
from mf_dist.settings import Registered

T = TypeVar("T")

FLAGS_PARAMETER = "flags"
CONTEXT_PARAMETER = "config_flags_context"


def flag_name(name: str) -> str:
    """The option of a field: ``--`` and the name with dashes (``block_size`` → ``--block-size``)."""
    return "--" + name.replace("_", "-")


def _plain_type(annotation: Any) -> tuple[Any, list[Any]]:
    """The annotation without ``| None`` and ``Annotated``, and the ``Annotated`` metadata it had."""
    metadata: list[Any] = []
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation, *extra = get_args(annotation)
            metadata += extra
        elif origin in (Union, types.UnionType):
            rest = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(rest) != 1:
                return annotation, metadata
            annotation = rest[0]
        else:
            return annotation, metadata


def _choices(annotation: Any, metadata: list[Any]) -> list[str] | None:
    """The values a string setting may take, if it has a fixed set (read now: the registry is complete)."""
    for item in metadata:
        if isinstance(item, Registered):
            return item.names()
    if get_origin(annotation) is Literal and all(isinstance(value, str) for value in get_args(annotation)):
        return list(get_args(annotation))
    return None


def option_parameter(owner: type[BaseModel], name: str, panel: str | None = None) -> inspect.Parameter:
    """The keyword parameter, annotated with its ``typer.Option``, that sets field ``name`` of ``owner``.

    Raises TypeError for a field with no flag type and ValueError for one with no description.
    """
    field = owner.model_fields[name]
    if not field.description:
        raise ValueError(f"{owner.__name__}.{name} has no description (it is the help of {flag_name(name)})")
    kind = table_kind(field)
    value_field: FieldInfo = kind if kind is not None else field
    annotation, metadata = _plain_type(value_field.annotation)
    metadata += value_field.metadata
    # A table's own default is its model's; a default_factory's value is not known here.
    default = None if kind is not None or field.is_required() or field.default_factory else field.default
    declarations: list[str] = []
    choices = _choices(annotation, metadata)
    if choices is not None:
        python_type: Any = Literal[tuple(choices)]
    elif annotation is bool:
        python_type = bool
        declarations = [f"{flag_name(name)}/--no-{name.replace('_', '-')}"]
    elif annotation in (int, float, str):
        python_type = annotation
    else:
        raise TypeError(
            f"{owner.__name__}.{name}: no flag for type {value_field.annotation!r}; give it one in "
            f"mf_dist.config_flags or make it a table with a kind"
        )
    # Escaped: typer renders help as rich markup, where "[cluster.*]" would be a style tag.
    help_text = escape(field.description)
    option = typer.Option(default, *declarations, help=help_text, rich_help_panel=panel)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[python_type]
    )


def is_flag(field: FieldInfo) -> bool:
    """Whether a field gets a flag: all do but those declared ``json_schema_extra={"flag": False}``.

    Such a field (a mapping, say) is set in the config file only; it still needs a description.
    """
    extra = field.json_schema_extra
    return not (isinstance(extra, dict) and extra.get("flag") is False)


def _given(context: typer.Context, name: str) -> bool:
    """Whether the user gave option ``name`` (rather than click filling in its default)."""
    source = context.get_parameter_source(name)
    # Click's ParameterSource, compared by name: typer may bring its own copy of click.
    return source is not None and source.name != "DEFAULT"


def config_flags(
    owner: type[BaseModel],
    names: Iterable[str] | None = None,
    panel: Callable[[str], str | None] | None = None,
) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorate a typer command with one flag per field of ``owner`` (or per field in ``names``).

    The command declares its other options as usual and a parameter
    ``flags`` (no default), which receives ``{field name: value}`` for the
    flags given on the command line. ``panel(name)`` names the help panel
    of a field's flag (None: the command's own). The command's own
    parameters must not share a name with a chosen field (ValueError).
    """
    chosen = (
        [name for name, field in owner.model_fields.items() if is_flag(field)]
        if names is None
        else list(names)
    )

    def decorate(command: Callable[..., T]) -> Callable[..., T]:
        signature = inspect.signature(command, eval_str=True)
        if FLAGS_PARAMETER not in signature.parameters:
            raise TypeError(f"{command.__name__} needs a parameter {FLAGS_PARAMETER!r} for the given flags")
        own = [parameter for parameter in signature.parameters.values() if parameter.name != FLAGS_PARAMETER]
        clash = {parameter.name for parameter in own} & {*chosen, CONTEXT_PARAMETER}
        if clash:
            raise ValueError(f"{command.__name__}'s own parameters {sorted(clash)} clash with generated ones")
        generated = [option_parameter(owner, name, panel(name) if panel else None) for name in chosen]

        # Typer passes the click context to a parameter annotated typer.Context.
        context_parameter = inspect.Parameter(
            CONTEXT_PARAMETER, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context
        )

        def with_flags(**arguments: Any) -> T:
            context = arguments.pop(CONTEXT_PARAMETER)
            given = {}
            for name in chosen:
                value = arguments.pop(name)
                # Not "value is not None": a flag shows the field's default, and
                # only a flag the user gave may replace the config file's value.
                if _given(context, name):
                    given[name] = value
            return command(**arguments, **{FLAGS_PARAMETER: given})

        # Not functools.wraps: typer reads __signature__, and the command's
        # string annotations must not be resolved in this module's namespace.
        with_flags.__signature__ = signature.replace(parameters=[*own, *generated, context_parameter])  # type: ignore[attr-defined]
        for attribute in ("__name__", "__qualname__", "__doc__", "__module__"):
            setattr(with_flags, attribute, getattr(command, attribute))
        return with_flags

    return decorate
