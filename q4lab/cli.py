"""`q4lab info | build | resources | shapes | sweep | bench | configs | fleet | dispatch | report`: each
command's options and work live in the module that owns it (`kernels`, `amd_asm`, `shapes`, `sweep_cli`,
`fleet`, `dispatch`, `report`); this file only wires them to argparse."""
from __future__ import annotations

import argparse
import errno
import importlib
import sys

# command -> (module that owns it, one-line help)
COMMANDS = {
    "info": ("q4lab.kernels", "torch, vendor, GPU, compilers and where kernels are built"),
    "build": ("q4lab.kernels", "build the kernel library for this (or a named) GPU arch"),
    "resources": ("q4lab.amd_asm", "each kernel instance's registers, LDS, spills and waves per SIMD on AMD targets"),
    "shapes": ("q4lab.shapes", "list the canonical shapes (name, family, N, K, model)"),
    "sweep": ("q4lab.sweep_cli", "measure M grids and N sweeps into a raw log and a parquet dataset"),
    "bench": ("q4lab.sweep_cli", "time every impl on NxK sizes of your choice into a dataset (sweep 'bench')"),
    "configs": ("q4lab.sweep_cli", "time every simt launch configuration into a dataset (sweep 'configs')"),
    "fleet": ("q4lab.fleet", "the `ray start` flags announcing this node's GPUs to a sweep fleet (fleet resources)"),
    "dispatch": ("q4lab.dispatch", "fit the rule impl='auto' follows to datasets (q4lab dispatch fit DATA --out RULE.json)"),
    "report": ("q4lab.report", "run every notebook through papermill into reports/index.html"),
}

DESCRIPTION = ("q4lab: fused 4-bit (NF4/FP4) dequantize+GEMM kernels at LLM-inference batch sizes. Measure "
               "on a GPU, then read crossovers, latency floors and N-resonance in reports/index.html.")
EXAMPLES = """examples:
  q4lab report                                   every notebook on data/*.parquet -> reports/index.html
  q4lab report --data runs/mygpu.parquet         the same pages for your own GPU's dataset
  q4lab report -p crossover.dtypes=fp32 -p n_resonance.K=8192
                                                 narrow one notebook (NOTEBOOK.NAME=VALUE; NAME=VALUE: all)
  q4lab shapes                                   the canonical shapes a sweep can take
  q4lab sweep grid --shapes all --dtypes fp16,bf16 --out runs/mygpu.parquet
  q4lab sweep nsweep --k 4096 --m 1,8 --out runs/mygpu_nsweep.parquet
  q4lab sweep grid --preset shipped --gpus all --out data/h200_mgrid.parquet
                                                 refresh the shipped grid (data/README.md: about 10 minutes)
  q4lab bench --shapes 28672x8192 --m 1,8 --out runs/bench.parquet
                                                 every impl on sizes of your choice (sweep 'bench')
  q4lab info                                     torch, GPU, compilers; what this machine can do
  q4lab resources --arch gfx1201                 each kernel's VGPRs, spills and waves per SIMD on an AMD target

q4lab COMMAND --help explains each command's options."""

# What to do about an OS error, by errno: the exception class alone does not tell a full disk from a
# read-only one
_OS_ERROR_FIXES = {
    errno.EACCES: "check its permissions, or give a path you can write to",
    errno.EPERM: "check its permissions, or give a path you can write to",
    errno.EISDIR: "a folder stands where a file goes: give a file path",
    errno.ENOTDIR: "part of that path is a file, not a folder: fix the path",
    errno.ENOSPC: "the disk is full: free some space, or write somewhere else",
    errno.EDQUOT: "the disk quota is used up: free some space, or write somewhere else",
    errno.EROFS: "that file system is read-only: give a path on a writable one",
}


def _os_error_line(err: OSError) -> str:
    """An OS error in one line: what failed, on which path(s), and what to do (where that is a path's)."""
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    fix = _OS_ERROR_FIXES.get(err.errno, "check the path, its permissions and the free disk space" if paths else "")
    return f"{err.strerror or err}{': ' + paths if paths else ''}{'; ' + fix if fix else ''}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="q4lab", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    except OSError as err:  # permissions, a full disk, a folder where a file goes: the user's to fix
        print(f"q4lab {args.command}: error: {_os_error_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
