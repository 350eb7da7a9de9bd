"""The ``mmid`` command line: one entry point whose subcommands reach
``training``, ``engine`` and ``stream``.

Each subcommand lives in its own module exposing ``add_arguments(parser)``
and ``run(args, cfg) -> int``; the module is imported only when its
subcommand runs, so ``mmid --help`` stays fast and serving never imports
the training code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from engine.config import ConfigError, load_config

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("training.synth.cli", "write a synthetic corpus in the IEMOCAP release layout"),
    "prepare": ("training.prepare_cli", "reorganise IEMOCAP or your own clips into a dataset"),
    "train": ("training.train_cli", "train MME2E or sparse MME2E on a prepared dataset"),
    "evaluate": ("training.evaluate", "evaluate a trained run on a split"),
    "flops": ("training.flops", "measure FLOPs per window of a trained run"),
    "export": ("engine.export", "export a trained run to a self-contained engine folder"),
    "bench": ("engine.bench", "benchmark engines: latency, throughput, memory"),
    "stream": ("stream.cli", "identify who speaks in live sources, publish to Redis"),
    "events": ("stream.events_cli", "follow identity events from Redis"),
    "demo": ("stream.demo", "run the end-to-end demo on embedded defaults"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmid",
        description="Who is speaking, from video, voice and words together.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="subcommands:\n"
        + "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items())
        + "\n\nRun `mmid SUBCOMMAND --help` for its options.",
    )
    _add_common(parser)
    parser.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="SUBCOMMAND")
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="TOML file overriding config.toml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable)",
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    # Find the subcommand: the first word naming one.
    index = next((i for i, word in enumerate(argv) if word in COMMANDS), None)
    if index is None:
        top.parse_args(argv)
        top.print_help()
        return 0 if not argv or set(argv) & {"-h", "--help"} else 2
    name = argv[index]
    rest = argv[:index] + argv[index + 1 :]
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common)
    known, _ = common.parse_known_args(rest)
    try:
        cfg = load_config(known.config, known.overrides)
    except ConfigError as exc:
        print(f"mmid: config error: {exc}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"mmid {name}", description=help_)
    _add_common(parser)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args, cfg) or 0)
    except ConfigError as exc:
        print(f"mmid {name}: config error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:  # a missing input (engine, run, corpus, file): its message names it
        print(f"mmid {name}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mmid {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
