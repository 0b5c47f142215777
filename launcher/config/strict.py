"""The base of every section of a recipe and a cluster profile: unknown keys, booleans taken for numbers,
integers beyond 64 bits, inf/nan and control characters are all refused, with the field named."""

from __future__ import annotations

import unicodedata
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

# A field whose text may hold line breaks and other control characters (shell lines the author writes):
# Field(json_schema_extra=FREE_TEXT). Every other string of a recipe or profile is one line of printable text.
FREE_TEXT = {"free_text": True}


def control_character(text: str) -> str | None:
    """The first control or line-separator character of `text` (as repr), or None. Such a character in a
    name or path would end a line of a job script (a command injected after it) or hide text in a log."""
    for char in text:
        if unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            return repr(char)
    return None


def _strings(value: Any):
    """Every string in a plain value (dict keys included), nested lists and dicts walked."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


class Strict(BaseModel):
    # inf/nan are never a meaningful setting (lr: 1e999 reads as inf)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _one_line_of_text(cls, data):
        """No control characters (newline, carriage return, NUL, escape...) in any text of a recipe or profile:
        values reach job scripts, command lines and logs. Sections (sub-models) check their own fields."""
        if not isinstance(data, dict):
            return data
        for key, value in data.items():
            field = cls.model_fields.get(key) if isinstance(key, str) else None
            if field is not None and (
                _holds_model(field.annotation) or (field.json_schema_extra or {}).get("free_text")
            ):
                continue
            for text in _strings(key if field is None else value):
                found = control_character(text)
                if found:
                    raise ValueError(
                        f"{key!s}: holds the control character {found}; names, paths and settings are one line of "
                        "printable text (a line break would end a line of the Slurm job script)"
                    )
        return data

    @model_validator(mode="before")
    @classmethod
    def _no_bool_as_number(cls, data):
        """YAML reads yes/no/on/off as booleans, and pydantic would take True as the number 1; an integer of
        40 digits would be taken as it is (a run of 10^40 steps) and overflow torch and numpy later."""
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key) if isinstance(key, str) else None
                if isinstance(value, bool) and field is not None and bool not in _types_in(field.annotation):
                    raise ValueError(
                        f"{key}: expected a number or text, got the boolean {value!r} (YAML reads "
                        "yes/no/on/off/true/false as booleans)"
                    )
                if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
                    raise ValueError(f"{key}: {value} is out of range (a setting here is a 64-bit integer)")
        return data


def _holds_model(annotation) -> bool:
    """Whether the annotation admits a sub-model (its own validators check its text)."""
    if isinstance(annotation, type):
        return issubclass(annotation, BaseModel)
    return any(_holds_model(arg) for arg in getattr(annotation, "__args__", ()) or ())


def _types_in(annotation) -> set:
    """The plain types an annotation admits (unions, Optional and Annotated unwrapped)."""
    if isinstance(annotation, type):
        return {annotation}
    found = set()
    for arg in getattr(annotation, "__args__", ()) or ():
        found |= _types_in(arg)
    return found
