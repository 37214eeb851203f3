"""The pipeline deployment's typed parameters, so Prefect's "Run" form is usable and Prefect
rejects a bad run before any worker starts.

Built from ``spec_core.config``'s dataclasses, never restated: every section becomes a form group,
every key a field with its type (choice keys as a dropdown), the preset's default and the key's
comment from ``config.py`` as its description. A form field left empty keeps the preset's value
(so keys whose value is null are set to null with an override instead). Dotted overrides stay: the
schema names every valid key, so ``training.num_stepz=3`` is refused when the run is created.
Precedence: preset < form < overrides.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

from spec_core import config as config_module
from spec_core.config import CHOICES, Config, field_descriptions, load_config

PRESET = "configs/smollm2-chitchat.yaml"
LOADER_FIELDS = {"env_refs"}  # filled by the config loader, never by users


def _user_fields(section: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(section) if f.name not in LOADER_FIELDS]


def _dotted_keys(section: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(section, vars(config_module))
    for f in _user_fields(section):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            keys += _dotted_keys(kind, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


CONFIG_KEYS = _dotted_keys(Config)
OVERRIDE_PATTERN = "^(" + "|".join(re.escape(k) for k in CONFIG_KEYS) + ")=.*$"
Override = Annotated[
    str,
    StringConstraints(pattern=OVERRIDE_PATTERN),
    Field(description="section.key=value, e.g. training.num_steps=60 (the key must exist)"),
]
Mode = Literal["local", "deployments"]


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return json.dumps(f.default)
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if not dataclasses.is_dataclass(value):
            return json.dumps(value)
    return ""


def _form_model(section: type, dotted: str) -> type[BaseModel]:
    """All keys of one config section, optional (empty = the preset's value); a nested
    section is always there (its own fields empty), so the form shows every field at once."""
    hints = typing.get_type_hints(section, vars(config_module))
    notes = field_descriptions(section)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        key = f"{dotted}.{f.name}"
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            kind = _form_model(kind, key)
            fields[f.name] = (kind, Field(default_factory=kind, description=kind.__doc__))
            continue
        else:
            if key in CHOICES:
                kind = Literal[CHOICES[key]]  # type: ignore[valid-type]
            default = _default_text(f)
            note = notes.get(f.name, "")
            description = "; ".join(p for p in (note, f"built-in default {default}") if p)
        fields[f.name] = (Optional[kind], Field(None, description=description))
    doc = (section.__doc__ or "").strip()
    if doc.startswith(section.__name__ + "("):  # dataclass's generated signature: no prose
        doc = ""
    name = "".join(part.title() for part in dotted.split(".")) + "Form"
    return create_model(
        name,
        __config__=ConfigDict(extra="forbid", title=dotted),
        __doc__=doc or f"'{dotted}' settings (empty fields keep the preset's values)",
        **fields,
    )


def _config_form() -> type[BaseModel]:
    hints = typing.get_type_hints(Config, vars(config_module))
    fields = {}
    for f in _user_fields(Config):
        section = _form_model(hints[f.name], f.name)
        fields[f.name] = (section, Field(default_factory=section))
    return create_model(
        "ConfigForm",
        __config__=ConfigDict(extra="forbid"),
        __doc__="Config sections; a field left empty keeps the preset's value.",
        **fields,
    )


ConfigForm = _config_form()


def form_overrides(form: Union[BaseModel, dict[str, Any], None]) -> list[str]:
    """The form's filled-in fields as dotted overrides (``training.num_steps=60``)."""
    if form is None:
        return []
    data = form.model_dump(exclude_none=True) if isinstance(form, BaseModel) else form
    out: list[str] = []

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if value is None:
                continue
            if isinstance(value, dict) and f"{prefix}{key}" not in ("inference.extra_args",):
                walk(value, f"{prefix}{key}.")
            else:
                out.append(f"{prefix}{key}={json.dumps(value)}")

    walk(data, "")
    return out


def pipeline_overrides(
    overrides: Optional[list[str]],
    mode: Optional[str],
    settings: Union[BaseModel, dict[str, Any], None],
) -> list[str]:
    """Form, then the dotted overrides, then the mode: the order later ones win in."""
    return (
        form_overrides(settings)
        + list(overrides or [])
        + ([f"orchestration.mode={mode}"] if mode else [])
    )


def config_for_parameters(parameters: dict[str, Any]) -> Config:
    """The config a pipeline flow run's parameters describe (its run id aside): for hooks, which
    see the parameters but not the run's resolved config."""
    return load_config(
        parameters.get("config_path"),
        pipeline_overrides(
            parameters.get("overrides"), parameters.get("mode"), parameters.get("settings")
        ),
    )
