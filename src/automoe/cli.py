"""`automoe <command>`: the command line. Each command's options live with the command's own module."""

from __future__ import annotations

import sys

COMMANDS = {
    "finetune": ("automoe.train.cli", "fine-tune a model from a recipe (no arguments: the embedded default)"),
    "bench": ("automoe.bench.cli", "benchmark automoe against Transformers v5 (and its peers) on this machine"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        from . import __version__

        print(f"automoe {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: automoe [--version] <command> [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nautomoe: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
