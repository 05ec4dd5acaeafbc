"""Check Kubernetes manifests offline against the models of the official Python client.

Every key must be a field of its object type (the API server would drop or
reject an unknown one), every value must have the field's type, and the
client's own constructors check the required fields.
"""

from __future__ import annotations

import re
from typing import Any

import kubernetes.client

PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "datetime": (str,),
    "date": (str,),
    "bytes": (str,),
    # int-or-string fields (ports, quantities) and free-form objects.
    "object": (int, str, dict, list),
}


def model_name(document: dict[str, Any]) -> str:
    """``apps/v1`` + ``Deployment`` → ``V1Deployment`` (the client's class name)."""
    version = document["apiVersion"].rsplit("/", 1)[-1]
    return version[0].upper() + version[1:] + document["kind"]


def unknown_fields(data: Any, type_name: str, path: str = "") -> list[str]:
    """Paths of keys that the type does not have, and of values of the wrong type."""
    if type_name in PRIMITIVES:
        if isinstance(data, bool) and type_name != "bool" and type_name != "object":
            return [f"{path}: expected {type_name}, got a boolean"]
        return (
            [] if isinstance(data, PRIMITIVES[type_name]) else [f"{path}: expected {type_name}, got {data!r}"]
        )
    # Client releases spell containers "list[T]"/"dict(str, T)" or "List[T]"/"Dict[str, T]".
    if match := re.fullmatch(r"[lL]ist\[(.+)\]", type_name):
        if not isinstance(data, list):
            return [f"{path}: expected a list"]
        return [
            problem
            for i, item in enumerate(data)
            for problem in unknown_fields(item, match[1], f"{path}[{i}]")
        ]
    if match := re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", type_name):
        if not isinstance(data, dict):
            return [f"{path}: expected a mapping"]
        return [
            problem
            for key, value in data.items()
            for problem in unknown_fields(value, match[1] or match[2], f"{path}.{key}")
        ]
    model = getattr(kubernetes.client, type_name)
    if not isinstance(data, dict):
        return [f"{path}: expected a {type_name} mapping"]
    fields = {json_key: attribute for attribute, json_key in model.attribute_map.items()}
    problems = [f"{path}.{key}: not a field of {type_name}" for key in data if key not in fields]
    for key, value in data.items():
        if key in fields:
            problems += unknown_fields(value, model.openapi_types[fields[key]], f"{path}.{key}")
    return problems


def check_object(document: dict[str, Any]) -> Any:
    """Raise ``AssertionError`` for unknown fields or wrong types; ``ValueError`` for missing required ones.

    Returns the client model object built from the document.
    """
    type_name = model_name(document)
    problems = unknown_fields(document, type_name, document["kind"])
    assert not problems, "\n".join(problems)
    client = kubernetes.client.ApiClient()
    # The private deserializer is the one the client applies to API responses; it runs the
    # model constructors, which reject missing required fields.
    return client._ApiClient__deserialize(document, type_name)
