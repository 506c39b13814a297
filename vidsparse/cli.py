"""The ``vidsparse`` command: one argparse shell, one module per subcommand.

Each subcommand module exposes ``add_arguments(parser)``, ``run(args) -> int`` and a module
docstring (first line: the summary in ``vidsparse --help``; the whole: the description in
``vidsparse <command> --help``). Modules are imported only when their command runs, so
``vidsparse --help`` stays fast and a subcommand whose module is missing or broken does not
take the others down. User errors (``ValueError``/``TypeError`` from vidsparse's validation)
print one clear message and exit with status 2; a full disk or exhausted memory one line and
status 1; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import functools
import importlib
import importlib.util
import os
import re
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from vidsparse.errors import EXIT_INTERRUPTED, EXIT_RESOURCE, EXIT_USER_ERROR, UserError, resource_failure

# command -> module. Order is the order in ``vidsparse --help``.
COMMANDS: dict[str, str] = {
    "generate": "vidsparse.generate_cli",
    "inspect": "vidsparse.inspect_cli",
    "bench": "vidsparse.bench",
    "train-lora": "vidsparse.lora.cli",
}

_IMPORTED_AT = time.perf_counter()


def _module_docstring(module: str) -> str | None:
    """A module's docstring read from its source without importing it (imports torch)."""
    origin = _module_file(module)
    if origin is None:
        return None
    try:
        with open(origin, encoding="utf-8") as fh:
            return ast.get_docstring(ast.parse(fh.read())) or ""
    except (OSError, SyntaxError, UnicodeDecodeError):
        return ""


def _module_file(module: str) -> str | None:
    """The source file of a dotted module, found without importing its parent packages
    (``importlib.util.find_spec("vidsparse.lora.cli")`` would import ``vidsparse.lora``, and torch)."""
    top, *parts = module.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    origin, locations = spec.origin, list(spec.submodule_search_locations or [])
    for part in parts:
        found = next(
            (c for loc in locations for c in (Path(loc, part, "__init__.py"), Path(loc, f"{part}.py")) if c.is_file()),
            None,
        )
        if found is None:
            return None
        origin, locations = str(found), [str(found.parent)] if found.name == "__init__.py" else []
    return origin if origin and origin.endswith(".py") else None


def _summary(doc: str | None, module: str) -> str:
    if doc is None:
        return f"(unavailable: module {module} is not installed)"
    first = doc.strip().splitlines()[0] if doc.strip() else ""
    return first.rstrip(".") or f"(see vidsparse {module} --help)"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: the error and where the flags are listed, not the
    whole usage block (tens of lines for ``generate``), which buries the line that matters."""

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)  # for error(): what was typed
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        if message.startswith("the following arguments are required"):
            # argparse stops at a missing flag before it lists the unknown ones: a typo of the
            # missing flag (--patern for --pattern) would go unnamed
            argv = getattr(self, "_argv", [])
            known = _actions_by_flag(self)
            unknown = [t for t in argv if t.startswith("--") and t.split("=", 1)[0] not in known]
            if unknown:
                message = f"{message}; {unrecognized(unknown, argv, self)}"
        end = "" if message.endswith((".", "?")) else "."
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}{end} Run '{self.prog} --help' for its flags.\n")


def _actions_by_flag(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every flag spelling of ``parser`` -> its action (argparse keeps no public view of them)."""
    return {o: a for a in parser._actions for o in a.option_strings}


def unrecognized(extra: Sequence[str], argv: Sequence[str], parser: argparse.ArgumentParser) -> str:
    """The error for arguments ``parser`` does not take, with what was probably meant: the
    closest flag for a typo, or that a switch takes no value (``--sink false``)."""
    actions = _actions_by_flag(parser)
    notes = []
    for token in extra:
        if token.startswith("-"):
            close = difflib.get_close_matches(token.split("=", 1)[0], list(actions), n=1, cutoff=0.7)
            if close:
                notes.append(f"{token}: did you mean {close[0]}?")
            continue
        before = argv[argv.index(token) - 1] if token in argv and argv.index(token) > 0 else ""
        action = actions.get(before)
        if action is not None and action.nargs == 0:
            off = next((o for o in action.option_strings if o.startswith("--no-")), None)
            if off is None and "--no-" + before.removeprefix("--") in actions:
                off = "--no-" + before.removeprefix("--")
            hint = f" ({off} turns it off)" if off and off != before else ""  # not for the --no- switch itself
            notes.append(f"{before} is a switch and takes no value{hint}")
    return f"unrecognized arguments: {' '.join(extra)}" + ("; " + "; ".join(notes) if notes else "")


def flags_given(args: argparse.Namespace, add: Callable[[argparse.ArgumentParser], None]) -> list[str]:
    """The flags of the group ``add`` defines that ``args`` sets to other than their defaults: how
    a command tells that flags of a mode it is not running were given (and would be ignored)."""
    probe = argparse.ArgumentParser(add_help=False)
    add(probe)
    defaults = vars(probe.parse_args([]))
    return [f"--{k.replace('_', '-')}" for k, v in defaults.items() if getattr(args, k, v) != v]


def in_flag_terms(message: str, parser: argparse.ArgumentParser, args: argparse.Namespace | None) -> str:
    """A library error in the command's terms: the Python API's names for a setting
    (``SparseConfig.dense_layers``, ``Radial.decay_factor``, ``GNA kernel_size``) become the flag
    that sets it (``--dense-layers``, ``--decay-factor``), where the command has that flag."""
    options = _actions_by_flag(parser)

    def config_field(m: re.Match) -> str:
        flag = "--" + m.group(1).replace("_", "-")
        return flag if flag in options else m.group(0)

    message = re.sub(r"SparseConfig\.([a-z_]+)\b", config_field, message)
    dests: dict[str, str] = dict(getattr(args, "_config_flags", None) or {})  # fields spelled otherwise
    for flag, action in options.items():
        dests.setdefault(action.dest, flag)  # a setting's first spelling names it
    # a config dataclass's own message ("rank must be an int >= 1") for a field named as its flag
    message = re.sub(r"^([a-z][a-z_]*)(?= must\b)", lambda m: dests.get(m.group(1), m.group(1)), message)
    fields: dict[str, str] = dict(getattr(args, "_pattern_flags", None) or {})
    patterns = sys.modules.get("vidsparse.patterns")
    if fields and patterns is not None:
        classes = "|".join(sorted({cls.__name__ for cls in patterns.PATTERNS.values()}, key=len, reverse=True))
        names = "|".join(sorted(fields, key=len, reverse=True))
        message = re.sub(
            rf"\b({classes})(?:\.| )({names})\b", lambda m: f"{fields[m.group(2)]} ({m.group(1)})", message
        )
    return message


def build_parser(command: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser; only ``command``'s subparser gets its full arguments."""
    parser = _Parser(
        prog="vidsparse",
        description="Sparse spatiotemporal attention for diffusers video models.",
        epilog="Run 'vidsparse <command> --help' for the flags of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors (also after a command)")
    from vidsparse import __version__

    parser.add_argument("--version", action="version", version=f"vidsparse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", title="commands", parser_class=_Parser)
    subparsers: dict[str, argparse.ArgumentParser] = {}
    for name, module in COMMANDS.items():
        doc = _module_docstring(module)
        subparsers[name] = sub.add_parser(
            name,
            help=_summary(doc, module),
            description=doc or None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        subparsers[name].add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks for errors"
        )
    return parser, subparsers


def seconds_since_process_start() -> float:
    """How long this process has run (Linux: /proc; elsewhere since ``vidsparse.cli`` was imported).

    ``vidsparse generate`` counts it as start-up: the interpreter, torch and the command's own
    imports (diffusers' pipeline modules load later, in the option checks: setup), which a user waits through as much as through the denoising.
    """
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter() - _IMPORTED_AT


def _find_command(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if arg in COMMANDS:
            return arg
        if not arg.startswith("-"):
            return None
    return None


def _load(command: str):
    module = COMMANDS[command]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            raise UserError(
                f"The '{command}' command is not available in this installation: module {module} is missing. "
                "Reinstall vidsparse (pip install -e .) or use another command (vidsparse --help)."
            ) from None
        raise


def _format_warning(message, category, filename, lineno, line=None, terms=None) -> str:
    """vidsparse's own warnings as one line, like its errors (in the command's flag terms once
    its arguments are parsed); other libraries' keep their origin."""
    if f"{os.sep}vidsparse{os.sep}" in str(filename) or str(message).startswith("vidsparse:"):
        text = str(message).removeprefix("vidsparse: ")
        return f"vidsparse: warning: {terms(text) if terms else text}\n"
    return _DEFAULT_FORMAT(message, category, filename, lineno, line)


_DEFAULT_FORMAT = warnings.formatwarning


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vidsparse`` console script and ``python -m vidsparse``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = _format_warning
    debug = "--debug" in argv
    command = _find_command(argv)
    parser, subparsers, args = None, {}, None
    try:
        parser, subparsers = build_parser(command)
        module = None
        if command is not None:
            module = _load(command)
            module.add_arguments(subparsers[command])
        args, extra = parser.parse_known_args(argv)
        where = subparsers[command] if command is not None else parser
        if extra:
            where.error(unrecognized(extra, argv, where))
        warnings.formatwarning = functools.partial(
            _format_warning, terms=functools.partial(in_flag_terms, parser=where, args=args)
        )
        if args.command is None:
            parser.print_help()
            return EXIT_USER_ERROR
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("vidsparse: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UserError, ValueError, TypeError, FileNotFoundError) as exc:
        if debug:
            traceback.print_exc()
        prog = f"vidsparse {command}" if command else "vidsparse"
        where = subparsers.get(command) if command else parser
        message = in_flag_terms(str(exc), where, args) if where is not None else str(exc)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (OSError, RuntimeError, MemoryError) as exc:  # a full disk or exhausted memory: one line, status 1
        reason = resource_failure(exc)
        if reason is None or debug:
            raise
        print(f"vidsparse {command or ''}".rstrip() + f": error: {reason}", file=sys.stderr)
        return EXIT_RESOURCE
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
        return int(exc.code) if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USER_ERROR)
    finally:
        warnings.formatwarning = _DEFAULT_FORMAT


__all__ = [
    "COMMANDS",
    "UserError",
    "build_parser",
    "flags_given",
    "in_flag_terms",
    "main",
    "unrecognized",
]
