"""Pattern options as command-line flags, shared by ``generate``, ``inspect`` and ``train-lora``.

Every init field of every registered pattern dataclass becomes one flag (decay_factor ->
--decay-factor). A flag shared by several patterns is parsed per pattern, with that
pattern's field type, once the pattern is known. Fields whose flag a command already uses
for itself (e.g. radial's block_size vs inspect's --block-size) get a "pattern-" prefix
(--pattern-block-size).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any

from vidsparse.errors import UserError

_OPT_PREFIX = "pattern_opt__"


@dataclass(frozen=True)
class FieldSpec:
    """How one dataclass field of one pattern is read from the command line."""

    pattern: str
    field: str
    kind: str  # bool | int | float | str | ints | floats | int_or_ints | float_or_floats
    default: Any
    optional: bool = False  # "none" means None
    choices: tuple[str, ...] | None = None
    help: str = ""
    arity: int | None = None  # length of a fixed-size tuple field

    def describe(self, full: bool = True) -> str:
        shape = {
            "bool": "on/off",
            "int": "int",
            "float": "float",
            "str": "text",
            "ints": "ints a,b,c",
            "floats": "floats a,b,c",
            "int_or_ints": "int or ints a,b,c",
            "float_or_floats": "float or floats a,b,c",
            "bools": "bools a,b,c",
            "bool_or_bools": "on/off, or one per axis like true,false,false",
        }[self.kind]
        if self.arity and self.kind in ("ints", "floats", "bools"):
            shape = f"{self.kind[:-1]}s " + ",".join("abcdefgh"[: self.arity])
        if self.choices:
            shape = "|".join(self.choices)
        if self.optional:
            shape += " or none"
        default = self.default
        if isinstance(default, tuple):
            default = ",".join(str(v) for v in default)
        text = f"{self.pattern}: {shape}, default {default}"
        return f"{text}. {_sentence(self.help)}" if self.help and full else text

    def parse(self, raw: Any, flag: str) -> Any:
        """Convert the raw command-line value (a str, or a bool for switches)."""
        text = str(raw).strip()
        if self.kind in ("bool", "bools", "bool_or_bools"):
            if isinstance(raw, bool):
                return raw if self.kind != "bools" else (raw, raw, raw)
            values = tuple(_parse_bool(p) for p in text.split(","))
            if None in values or (self.kind == "bool" and len(values) != 1):
                raise UserError(
                    f"{flag} {text!r} is not valid for --pattern {self.pattern}: expected {self.describe(False)}."
                )
            return values[0] if len(values) == 1 and self.kind != "bools" else values
        if self.optional and text.lower() == "none":
            return None
        try:
            if self.kind == "int":
                return int(text)
            if self.kind == "float":
                return float(text)
            if self.kind == "str":
                if self.choices and text not in self.choices:
                    raise ValueError
                return text
            parts = re.split(r"[,x]", text.lower())
            if not all(p.strip() for p in parts):
                raise ValueError
            cast = int if self.kind in ("ints", "int_or_ints") else float
            values = tuple(cast(p) for p in parts)
            if self.kind.endswith("_or_ints") or self.kind.endswith("_or_floats"):
                return values[0] if len(values) == 1 else values
            return values
        except ValueError:
            raise UserError(
                f"{flag} {text!r} is not valid for --pattern {self.pattern}: expected {self.describe(False)}. "
                f"Example: {flag} {self._example()}"
            ) from None

    def _example(self) -> str:
        if self.choices:
            return self.choices[0]
        return {
            "int": "4",
            "float": "0.5",
            "str": "value",
            "ints": "4,4,8",
            "floats": "0.5,0.5,0.5",
            "int_or_ints": "3 (or 3,5,5)",
            "float_or_floats": "0.5 (or 0.5,1,1)",
        }.get(self.kind, "")


def _sentence(text: str) -> str:
    """A field description as it follows "default X. " in --help: capitalised, no final period."""
    text = text.strip().rstrip(".")
    return text[:1].upper() + text[1:]


def _parse_bool(text: str) -> bool | None:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    return None


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        return (rest[0] if len(rest) == 1 else typing.Union[rest]), True  # noqa: UP007
    return tp, False


def _kind_of(tp: Any) -> tuple[str, tuple[str, ...] | None] | None:
    """Map a field annotation to a flag kind, or None when it has no command-line form."""
    if tp is bool:
        return "bool", None
    if tp is int:
        return "int", None
    if tp is float:
        return "float", None
    if tp is str:
        return "str", None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal and all(isinstance(a, str) for a in args):
        return "str", tuple(args)
    if origin is tuple and args:
        elems = {a for a in args if a is not Ellipsis}
        if elems == {bool}:
            return "bools", None
        if elems == {int}:
            return "ints", None
        if elems <= {int, float}:
            return "floats", None
    if origin in (typing.Union, types.UnionType):
        kinds = {_kind_of(a)[0] if _kind_of(a) else None for a in args}
        if kinds == {"bool", "bools"}:
            return "bool_or_bools", None
        if kinds == {"int", "ints"}:
            return "int_or_ints", None
        if kinds <= {"int", "float", "ints", "floats"} and None not in kinds:
            return ("float_or_floats" if kinds & {"ints", "floats"} else "float"), None
    return None


def _field_docs(cls: type) -> dict[str, str]:
    """Field descriptions: ``metadata["help"]``, attribute docstrings, trailing comments, or
    ``name: text`` lines of the class docstring (first one found wins)."""
    docs: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        text = f.metadata.get("help") if f.metadata else None
        if text:
            docs[f.name] = str(text)
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        tree, source = None, ""
    if tree is not None and tree.body and isinstance(tree.body[0], ast.ClassDef):
        body = tree.body[0].body
        lines = source.splitlines()
        for i, node in enumerate(body):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            name = node.target.id
            nxt = body[i + 1] if i + 1 < len(body) else None
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs.setdefault(name, " ".join(nxt.value.value.split()))
            line = lines[node.lineno - 1] if node.lineno - 1 < len(lines) else ""
            if "#" in line and node.end_lineno == node.lineno:
                comment = line.split("#", 1)[1].strip()
                if comment and not comment.startswith(("noqa", "type:")):
                    docs.setdefault(name, comment)
    doc = inspect.getdoc(cls) or ""
    for name, text in _docstring_entries(doc):
        docs.setdefault(name, text)
    # Last resort: the first clause of the class docstring that names the field.
    clauses = re.split(r"(?<=[.;])\s+|\n\s*\n", " ".join(doc.split()))
    for f in dataclasses.fields(cls):
        if f.name in docs:
            continue
        for clause in clauses:
            if f"``{f.name}``" in clause:
                docs[f.name] = clause.replace("``", "").rstrip(";")
                break
    return docs


# One entry: "name: text", "- name (type): text" or "``name``: text" (an Args-style list item,
# or a paragraph that opens with a field name).
_ENTRY = re.compile(r"^(\s*)[-*]?\s*`{0,2}(\w+)`{0,2}\s*(?:\([^)]*\))?\s*:\s+(\S.*)$")
# A section header such as "Args:" or "Returns:" (nothing after the colon).
_SECTION = re.compile(r"^\s*\w[\w ]*:\s*$")


def _docstring_entries(doc: str) -> list[tuple[str, str]]:
    """(name, full description) of every "name: text" entry of a docstring, in order.

    An entry runs over its continuation lines: every line indented deeper than the entry, and
    lines at the entry's own indent (a paragraph is not indented below its first line) up to the
    next entry or section header. A blank line or a less indented line ends it.
    """
    lines = doc.splitlines()
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(lines):
        m = _ENTRY.match(lines[i])
        i += 1
        if not m:
            continue
        indent, text = len(m.group(1)), [m.group(3).strip()]
        while i < len(lines) and lines[i].strip():
            cont = lines[i]
            depth = len(cont) - len(cont.lstrip())
            if depth < indent or (depth == indent and (_ENTRY.match(cont) or _SECTION.match(cont))):
                break
            text.append(cont.strip())
            i += 1
        out.append((m.group(2), " ".join(text).replace("``", "")))
    return out


def pattern_field_specs(cls: type) -> dict[str, FieldSpec]:
    """Command-line specs of a pattern class's init fields (fields with no CLI form are left out)."""
    if not dataclasses.is_dataclass(cls):
        return {}
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolved forward references: fall back to the raw annotations
        hints = {}
    docs = _field_docs(cls)
    name = getattr(cls, "name", cls.__name__.lower())
    specs: dict[str, FieldSpec] = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        tp = hints.get(f.name, f.type)
        if isinstance(tp, str):
            continue
        tp, optional = _unwrap_optional(tp)
        kind = _kind_of(tp)
        if kind is None:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        arity = None
        if typing.get_origin(tp) is tuple and Ellipsis not in typing.get_args(tp):
            arity = len(typing.get_args(tp))
        specs[f.name] = FieldSpec(name, f.name, kind[0], default, optional, kind[1], docs.get(f.name, ""), arity)
    return specs


def parse_dense_layers(text: str, *, error: type[Exception] = UserError, noun: str = "layer") -> tuple[int, ...]:
    """``--dense-layers`` syntax: ``"0,1"``, ``"0-3"``, ``"-1"`` (from the end) or ``"none"`` -> indices.

    Shared by ``vidsparse generate`` and ``vidsparse train-lora`` so both accept the same values;
    ``error`` is the exception type a bad value raises, ``noun`` what an index counts in its message.
    """
    if text.strip().lower() in ("none", ""):
        return ()
    layers: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if m and int(m.group(1)) <= int(m.group(2)):
            layers.extend(range(int(m.group(1)), int(m.group(2)) + 1))
        elif re.fullmatch(r"-?\d+", part):
            layers.append(int(part))
        else:
            raise error(
                f"--dense-layers expects {noun} indices like 0,1,2 or ranges like 0-3 (negative counts from the end, "
                f"'none' for no dense {noun}), got {text!r}."
            )
    return tuple(layers)


# Flags that mean one thing in every subcommand, so a pattern field of the same name always gets
# the "pattern-" prefix: --block-size is the kernel block (generate, inspect), radial's own block
# is --pattern-block-size everywhere (train-lora included).
COMMAND_FLAGS = frozenset({"--block-size"})


def _flag_name(field: str, reserved: set[str]) -> str:
    flag = "--" + field.replace("_", "-")
    return "--pattern-" + field.replace("_", "-") if flag in reserved or flag in COMMAND_FLAGS else flag


class _DeprecatedPatternFlag(argparse.Action):
    """An old spelling of a pattern flag: sets the same option, with a warning naming the new one."""

    def __init__(self, option_strings, dest, new_flag: str = "", **kwargs):
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(
            f"vidsparse: warning: {option_string} is deprecated here; it sets the pattern's own option, now spelled "
            f"{self.new_flag} ({option_string} means the kernel block size in vidsparse generate and inspect).",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def _format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def family_pattern_defaults() -> dict[tuple[str, str], list[tuple[str, Any]]]:
    """(pattern, field) -> [("wan", 0.2), ...]: the option each family's defaults give a pattern
    named on the command line, at the family's default video size (fitted to that grid by the
    pattern's ``fit_defaults``; fitted options can differ at other sizes). Only the fields a family
    record sets: a value ``fit_defaults`` derives from the grid alone (Radial's block on small
    frames, AttentionTile's global frames) is the same rule for every family, and the field's own
    description says it. Read from the family records, so --help shows what runs."""
    from vidsparse.families import families
    from vidsparse.layout import VideoLayout, auto_block_size

    out: dict[tuple[str, str], list[tuple[str, Any]]] = {}
    for family in families():
        try:
            geo = family.geometry
            layout = VideoLayout(*geo.latent_grid(*geo.default_video))
        except (ValueError, TypeError, AttributeError):
            continue
        for pattern, entry in family.pattern_defaults.items():
            try:
                own = entry(layout, False) if callable(entry) else (entry or {})
                options = family.pattern_options(pattern, layout, auto_block_size(layout))
            except (ValueError, TypeError):
                continue
            for field, value in options.items():
                if field in own:
                    out.setdefault((pattern, field), []).append((family.name, value))
    return out


def _same_value(value: Any, default: Any) -> bool:
    """``value`` means ``default``: equal, or a per-axis tuple repeating a scalar default (1,1,1 vs 1)."""
    if value == default:
        return True
    return isinstance(value, tuple) and not isinstance(default, tuple) and all(v == default for v in value)


def add_pattern_arguments(
    parser: argparse.ArgumentParser, default: str | None = None, *, family_defaults: bool = False
) -> None:
    """Add ``--pattern`` and one flag per field of every registered pattern to ``parser``.

    Call it after the command's own flags, so a clashing field flag gets the ``pattern-`` prefix.
    ``family_defaults``: the command resolves a pattern name with the model family's defaults
    (generate, train-lora), so each flag's help lists the family values that run without it.
    """
    from vidsparse.patterns import PATTERNS

    reserved = set(parser._option_string_actions)
    names = sorted(PATTERNS)
    group = parser.add_argument_group(
        "pattern", "The sparse attention pattern and its options (each option names the patterns it applies to)."
    )
    group.add_argument(
        "--pattern",
        default=default,
        required=default is None,
        metavar="NAME",
        help=f"sparse attention pattern, one of: {', '.join(names)}" + (f" (default {default})" if default else ""),
    )
    by_field: dict[str, list[FieldSpec]] = {}
    for pname in names:
        for spec in pattern_field_specs(PATTERNS[pname]).values():
            by_field.setdefault(spec.field, []).append(spec)
    by_family = family_pattern_defaults() if family_defaults else {}
    for field, specs in sorted(by_field.items()):
        flag = _flag_name(field, reserved)
        parts = []
        for s in specs:
            text = s.describe(full=False)
            # A pattern given by name runs its family's value, not the class default: say which.
            fams = [(f, v) for f, v in by_family.get((s.pattern, field), ()) if not _same_value(v, s.default)]
            if fams:
                values = ", ".join(f"{f} {_format_value(v)}" for f, v in fams)
                text += f" (family defaults, what runs without this flag: {values}; other families as the default)"
            parts.append(f"{text}. {_sentence(s.help)}" if s.help else text)
        desc = "; ".join(parts).replace("%", "%%")
        if all(s.kind == "bool" for s in specs):
            group.add_argument(
                flag, dest=_OPT_PREFIX + field, action=argparse.BooleanOptionalAction, default=None, help=desc
            )
        elif any(s.kind in ("bool", "bool_or_bools") for s in specs):
            # A bare switch means true; a value gives per-axis flags or another pattern's value.
            group.add_argument(
                flag, dest=_OPT_PREFIX + field, nargs="?", const="true", default=None, metavar="VALUE", help=desc
            )
        else:
            metavar = field.upper()
            group.add_argument(flag, dest=_OPT_PREFIX + field, default=None, metavar=metavar, help=desc)
    for old_flag in sorted(COMMAND_FLAGS - reserved):  # e.g. train-lora's old --block-size (radial's block)
        field = old_flag[2:].replace("-", "_")
        if field in by_field:
            group.add_argument(
                old_flag,
                dest=_OPT_PREFIX + field,
                default=None,
                action=_DeprecatedPatternFlag,
                new_flag=_flag_name(field, reserved),
                help=argparse.SUPPRESS,
            )
    parser.set_defaults(_pattern_flags={f: _flag_name(f, reserved) for f in by_field})


def pattern_options_from_args(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(pattern name, constructor options) from parsed flags; errors name the valid flags."""
    from vidsparse.patterns import PATTERNS, normalize_pattern_name

    raw_name = str(args.pattern)
    name = normalize_pattern_name(raw_name)
    if name not in PATTERNS:
        raise UserError(f"Unknown --pattern {raw_name!r}. Expected one of: {', '.join(sorted(PATTERNS))}.")
    specs = pattern_field_specs(PATTERNS[name])
    flags: dict[str, str] = getattr(args, "_pattern_flags", {})
    options: dict[str, Any] = {}
    for field, flag in flags.items():
        raw = getattr(args, _OPT_PREFIX + field, None)
        if raw is None:
            continue
        if field not in specs:
            valid = ", ".join(flags[f] for f in specs if f in flags) or "(none)"
            raise UserError(f"{flag} does not apply to --pattern {name}; its options are: {valid}.")
        spec = specs[field]
        if spec.kind != "bool" and isinstance(raw, bool):
            raise UserError(f"{flag} needs a value for --pattern {name}: {spec.describe(False)}.")
        options[field] = spec.parse(raw, flag)
    return name, options


def pattern_from_args(args: argparse.Namespace):
    """Build the pattern the flags describe (its own validation errors stay ValueError/TypeError)."""
    from vidsparse.patterns import make_pattern

    name, options = pattern_options_from_args(args)
    return make_pattern(name, **options)


__all__ = [
    "COMMAND_FLAGS",
    "FieldSpec",
    "add_pattern_arguments",
    "family_pattern_defaults",
    "parse_dense_layers",
    "pattern_field_specs",
    "pattern_from_args",
    "pattern_options_from_args",
]
