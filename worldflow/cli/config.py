"""``worldflow config show``: a preset's resolved config, one line per field with its one-line doc."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import tokenize
from functools import cache
from typing import Any

from worldflow.cli.app import add_config_args, resolve_config


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its one-line doc: the comment after the field, else the comment lines just above it."""
    src = inspect.getsource(cls)
    docs: dict[str, str] = {}
    above: list[str] = []
    lines = src.splitlines()
    comments = {t.start[0]: t.string.lstrip("# ").strip()
                for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    for i, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(comments.get(i, ""))
            continue
        name = stripped.split(":", 1)[0]
        if name.isidentifier() and ":" in stripped and not stripped.startswith(("def ", "class ")):
            docs[name] = comments.get(i) or " ".join(above)
        above = []
    return docs


def rows(obj: Any, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, JSON value, doc) for every leaf field of a config dataclass, in declaration order."""
    out = []
    docs = field_docs(type(obj))
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            out += rows(value, key + ".")
        else:
            out.append((key, json.dumps(value), docs.get(f.name, "")))
    return out


def show(args: argparse.Namespace) -> int:
    table = rows(resolve_config(args))
    width = max(len(k) + len(v) + 3 for k, v, _ in table)
    for key, value, doc in table:
        line = f"{key} = {value}"
        print(f"{line:<{width}}  # {doc}" if doc else line)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show the resolved config of a preset")
    csub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    s = csub.add_parser("show", help="print every field of the resolved config with its one-line doc",
                        description="Print the config a command would run with: the preset, then the "
                                    "key=value overrides, one line per field with its doc.")
    add_config_args(s)
    s.set_defaults(func=show)
