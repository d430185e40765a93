"""``python -m ltm_convert.run SCRIPT [ARGS...]``: run a script that builds models by name (timm's
``train.py``, ``validate.py``, your own) with the ``ltm_*`` names known, unchanged.

timm's scripts never import ltm_convert, so ``--model ltm_mobilevit_s`` would be an unknown model;
run through this module (``torchrun ... -m ltm_convert.run train.py ...`` works too), the package is
imported first (its ``__init__`` registers the names when timm is imported) and the script runs as
``python SCRIPT ARGS...`` would run it.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

USAGE = ("usage: python -m ltm_convert.run SCRIPT [ARGS...]\n"
         "  e.g. python -m ltm_convert.run train.py /data --model ltm_mobilevit_s --model-kwargs ratio=0.8")


def main(argv: list[str] | None = None) -> None:
    """Run ``argv[0]`` as ``__main__`` with ``argv`` as its ``sys.argv``; a missing script is one error line, exit 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if args else 2)
    script = Path(args[0])
    if not script.is_file():
        print(f"error: no script {args[0]}; give the path of a Python file (e.g. timm's train.py)", file=sys.stderr)
        raise SystemExit(2)
    sys.argv = args
    sys.path.insert(0, str(script.resolve().parent))  # as `python SCRIPT` puts the script's folder first
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
