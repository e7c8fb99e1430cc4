"""`sparsekit tune`: measure this machine's CPU crossovers (sparsekit.ops.cpu.tuner) and cache them
(sparsekit.ops.cpu.tuning);
`--show` prints what is in effect, `--reset` deletes the cache (the defaults apply again)."""
from __future__ import annotations

from sparsekit.ops.cpu import tuner, tuning

from .parser import OneLineParser


def main(argv) -> None:
    parser = OneLineParser(prog="sparsekit tune",
                           description="measure the CPU paths' crossovers on this machine (<= ~60 s; --quick: a few "
                                       "seconds) and cache them for every later run")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--quick", action="store_true", help="a few small sizes, 2 rounds: seconds, rougher values")
    what.add_argument("--show", action="store_true", help="print the values in effect and the cache file; measure nothing")
    what.add_argument("--reset", action="store_true", help="delete this machine's cache file: the defaults apply again")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if args.show:
            show()
        elif args.reset:
            path = tuning.reset()
            print(f"deleted {path}: the default crossovers apply" if path else
                  f"no tuning cache for this machine ({tuning.cache_path()}): the defaults already apply")
        else:
            result = tuner.tune(quick=args.quick, progress=not args.no_progress)
            path = tuning.save(result)
            print(f"measured in {result['seconds']:.1f} s{' (--quick)' if args.quick else ''}; wrote {path}")
    except OSError as error:  # a cache folder that cannot be written or read
        raise SystemExit(f"sparsekit tune: {error.filename or tuning.cache_dir()}: {error.strerror or error}")


def show() -> None:
    """Print the values in effect, where they come from, and the cache file's measurements."""
    print("\n".join(tuning.describe()))
    path = tuning.cache_path()
    try:
        record = tuning.load_file(path)
    except ValueError as error:  # corrupt or foreign: the lookups ignore it too
        print(f"cache file {path}: ignored ({error})")
        return
    if record is None:
        print(f"cache file {path}: none (`sparsekit tune` writes it)")
        return
    print(f"cache file {path}: written {record.get('written')}, {record.get('seconds')} s"
          f"{', --quick' if record.get('quick') else ''}, load average {record.get('load_average')}")
    for name, rows in record.get("measured", {}).items():
        print(f"  {name}: " + "; ".join(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in row.items()) for row in rows))
    for name, note in record.get("notes", {}).items():
        print(f"  {name}: {note}")
