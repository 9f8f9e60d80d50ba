"""`automoe finetune [-c recipe.yaml] [--resume] [--section.key VALUE ...]`."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import yaml

from .config import RecipeError, load_recipe, parse_overrides
from .runtime import RankStopped
from .stop import Interrupted

EPILOG = """\
With no recipe, runs the embedded default (examples/tiny_default.yaml): a tiny MoE model built locally,
fine-tuned on CPU in well under a minute to reverse words (bundled data), evaluated before and after, then
saved as a Hugging Face checkpoint in outputs/finetune/final. Any recipe key can be overridden with its
dotted name, e.g.  --optim.lr 1e-4 --train.max_steps 100 --output.dir runs/a
Several GPUs:  torchrun --nproc-per-node 8 -m automoe.cli finetune -c recipe.yaml
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="automoe finetune", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", help="recipe YAML (default: the embedded recipe)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output.dir")
    parser.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parser.parse_known_args(argv)
    try:
        recipe = load_recipe(args.config, parse_overrides(rest))
        if args.print_recipe:
            print(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
            return 0
        from .trainer import run

        run(recipe, resume=args.resume)
    except RecipeError as e:
        print(f"automoe finetune: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        if os.environ.get("RANK", "0") == "0":
            again = shlex.join(["automoe", "finetune", *[a for a in argv if a != "--resume"], "--resume"])
            print(f"automoe finetune: {e}. Continue the run with:\n  {again}\n(under torchrun: the same torchrun "
                  "command with --resume)", file=sys.stderr)
        return 128 + e.signum
    except RankStopped as e:
        print(f"automoe finetune: {e}", file=sys.stderr)
        return 1
    return 0
