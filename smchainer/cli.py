"""The ``smchainer`` command, and what every smchainer command shares.

Exit codes: 0 ok, 1 runtime error, 2 usage error. Errors are one
``Error: ...`` line on stderr; a traceback only with ``--debug``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

import smchainer
from smchainer.errors import SmchainerError, UsageError

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of exiting by itself."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {smchainer.__version__}"
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks and debug logs"
    )


#: Control characters as their escapes: no log line can be split or forged by them.
_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x09), *range(0x0a, 0x20), 0x7f,
                                                  *range(0x80, 0xa0))}
_ESCAPES.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


def escape_control(text: str) -> str:
    """``text`` with control characters (CR, LF, ESC, ...; not tab) written as escapes."""
    return text.translate(_ESCAPES)


class OneLineFormatter(logging.Formatter):
    """Each record's message on one line, control characters escaped; tracebacks as they are.

    Messages carry request data (a path, a Content-Type, a file name), and a
    CR/LF in a path such as ``/ping%0D%0AFORGED`` must not start a line of its
    own in the log.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_control(record.message)
        return super().formatMessage(record)


def setup_logging(level: int | str = logging.INFO) -> None:
    """Configure the root logger once, for a command (never for the library)."""
    if isinstance(level, str):
        level = parse_log_level(level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def setup_package_logging(level: int) -> None:
    """Show progress from the ``smchainer`` loggers only, at ``level``, on stderr.

    For commands that run user code in their own process (a training
    script): the root logger is the script's, so it is left alone, and the
    ``smchainer`` loggers do not propagate to it (no line twice). Calling it
    again replaces the handler rather than adding a second one.
    """
    package = logging.getLogger("smchainer")
    for handler in list(package.handlers):
        package.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(LOG_FORMAT))
    package.addHandler(handler)
    package.setLevel(level)
    package.propagate = False


def parse_log_level(value: str | int) -> int:
    """``"info"``, ``"DEBUG"`` or ``"20"`` as a :mod:`logging` level."""
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    level = logging.getLevelName(text.upper())
    if not isinstance(level, int):
        raise UsageError(f"unknown log level {value!r}: use debug, info, warning or error")
    return level


def run(body: Callable[[], int | None], debug: Callable[[], bool]) -> int:
    """Run a command body, turning errors into ``Error: ...`` and an exit code."""
    try:
        return int(body() or 0)
    except SmchainerError as error:
        if debug():
            logger.exception("failed")
        print(f"Error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if debug():
            raise
        print(f"Error: {type(error).__name__}: {error} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


def run_command(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    body: Callable[[argparse.Namespace], int | None],
) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run ``body(args)`` under :func:`run`.

    ``--debug`` anywhere on the line shows tracebacks, even of usage errors.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(lambda: body(parser.parse_args(argv)), lambda: "--debug" in argv)


def _plugins(args: argparse.Namespace) -> int:
    from smchainer.plugins import describe_plugins, get_plugin_manager

    pm = get_plugin_manager(user_module=args.user_module)
    print(json.dumps(describe_plugins(pm), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="smchainer",
        description="Train and serve Chainer models with the SageMaker contract. "
        "See also smchainer-train and smchainer-serve.",
    )
    add_common_arguments(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    plugins = commands.add_parser(
        "plugins",
        help="list the loaded plugins and their hooks as JSON",
        description="List the plugins a server or training job would load, and the hooks "
        "each implements, as JSON. Honours SMCHAINER_LOAD_PLUGINS and "
        "SMCHAINER_DISABLE_PLUGIN_AUTOLOAD.",
    )
    plugins.add_argument(
        "--user-module", metavar="FILE", help="also load this user script (inference.py)"
    )
    plugins.set_defaults(handler=_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``smchainer`` command."""
    parser = build_parser()

    def body(args: argparse.Namespace) -> int:
        setup_logging(logging.DEBUG if args.debug else logging.WARNING)
        if args.command is None:
            parser.print_help()
            return 2
        return args.handler(args)

    return run_command(parser, argv, body)


if __name__ == "__main__":
    sys.exit(main())
