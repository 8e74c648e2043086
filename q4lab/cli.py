"""`q4lab info | build | sweep | dispatch | report`: each command's options and work live in the module that owns it
(`kernels`, `sweep_cli`, `dispatch`, `report`); this file only wires them to argparse."""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module that owns it, one-line help)
COMMANDS = {
    "info": ("q4lab.kernels", "torch, vendor, GPU, compilers and where kernels are built"),
    "build": ("q4lab.kernels", "build the kernel library for this (or a named) GPU arch"),
    "sweep": ("q4lab.sweep_cli", "measure M grids and N sweeps into a raw log and a parquet dataset"),
    "dispatch": ("q4lab.dispatch", "fit the rule impl='auto' follows to datasets (q4lab dispatch fit DATA --out RULE.json)"),
    "report": ("q4lab.report", "run every notebook through papermill into reports/index.html"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="q4lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if argv[:1] == [name]:  # import only the module of the command asked for: startup stays fast
            module = importlib.import_module(module_name)
            getattr(module, f"add_{name}_arguments")(cmd)
            cmd.set_defaults(run=getattr(module, f"{name}_command"))
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"q4lab {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
