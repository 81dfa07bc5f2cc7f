"""``python -m edgellm.runtime run|profile|check|threads PKG``: the device-side command line.

argparse, not click: a device has only the runtime.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from edgellm.errors import EdgeError
from edgellm.runtime import load
from edgellm.runtime.profile import format_report


def read_inputs(model, paths: list[str]) -> dict[str, np.ndarray]:
    """Inputs from .npy (one per input, in order, or NAME=file.npy) or one .npz keyed by name."""
    if not paths:
        return model.example_inputs()
    names = [s.name for s in model.inputs]
    if len(paths) == 1 and paths[0].endswith(".npz"):
        try:
            with np.load(paths[0], allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as e:
            raise EdgeError(f"cannot read inputs from {paths[0]}: {e}") from None
    inputs = {}
    for i, item in enumerate(paths):
        name, sep, path = item.partition("=")
        if not sep:
            if i >= len(names):
                raise EdgeError(f"{len(paths)} input files for a model with {len(names)} input(s)")
            name, path = names[i], item
        try:
            inputs[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise EdgeError(f"cannot read input {name!r} from {path}: {e}") from None
    return inputs


def measure_package(path, trusted_keys=None, counts: list[int] | None = None) -> dict:
    """Load the package and time it here (``python -m edgellm.runtime threads``): a model's call on its stored sample,
    one loaded copy per thread count; a language model's short chat turn (``threads.measure_lm``)."""
    from edgellm.runtime import threads

    first = load(path, threads=1, trusted_keys=trusted_keys)
    if first.manifest.get("kind") == "llm":
        return threads.measure_lm(first, counts)

    def make_run(k: int):
        model = first if k == 1 else load(path, threads=k, trusted_keys=trusted_keys)
        arrays = model._arrange((), model.example_inputs())
        return lambda: model._engine.run(arrays)

    return threads.measure(make_run, threads.MODEL_WORK, counts)


def format_threads(report: dict) -> str:
    """The human twin of ``threads --json``: the table, the best count, and what a load picks now."""
    rec = report["record"]
    fastest = min(rec["p50_ms"].values())
    lines = [f"{report['package']} on {rec['cpu']}, {rec['cores']} physical core(s); p50 of {rec['work']}",
             f"{'threads':>7}  {'p50 ms':>9}  {'vs fastest':>10}"]
    for k, v in rec["p50_ms"].items():
        lines.append(f"{k:>7}  {v:>9.3f}  {v / fastest:>9.2f}x" + ("  <- best" if int(k) == rec["best"] else ""))
    lines.append(f"best: {rec['best']} thread(s) (the fewest within {report['within']:.0%} of the fastest)")
    lines.append(f"a load here uses {report['load']['threads']} ({report['load']['from']})"
                 + (f"; saved to {report['saved']}" if report["saved"] else "; --save keeps this result for loads on this CPU"))
    return "\n".join(lines)


def threads_command(args) -> int:
    """Time the package here at 1, 2, 4 .. physical-cores threads. The package is signed and hashed, so the result is
    printed, and with --save kept in a per-user cache that loads on this CPU prefer (runtime/threads.py)."""
    from edgellm.runtime import threads
    from edgellm.runtime.package import read_manifest

    rec = measure_package(args.package, args.trusted_keys)  # loads it: checksums (and signature) verified
    manifest = read_manifest(args.package)
    path = str(threads.save(manifest, rec)) if args.save else None
    chosen, source = threads.choose(manifest)
    report = {"schema": threads.SCHEMA, "package": args.package, "record": rec, "within": threads.WITHIN, "saved": path,
              "load": {"threads": chosen, "from": source}}
    print(json.dumps(report, indent=2) if args.json else format_threads(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgellm.runtime", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "profile", "check", "threads"):
        p = sub.add_parser(name)
        p.add_argument("package")
        if name != "threads":
            p.add_argument("--threads", type=int, default=None)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--trusted-key", dest="trusted_keys", action="append", default=[], metavar="KEY.pub",
                       help="refuse the package unless signed by this key (repeat for several; adds to $EDGELLM_TRUSTED_KEYS)")
        if name == "run":
            p.add_argument("--input", action="append", default=[], help="x.npy, NAME=x.npy or inputs.npz (default: the package's sample)")
            p.add_argument("-o", "--output", help="write outputs to this .npz")
        if name == "profile":
            p.add_argument("--runs", type=int, default=100)
            p.add_argument("--warmup", type=int, default=10)
            p.add_argument("--per-op", action="store_true")
        if name == "check":
            p.add_argument("--tolerance", type=float, default=None,
                           help="max |error| relative to the output scale [default: the package's own, set at build time]")
        if name == "threads":
            p.add_argument("--save", action="store_true",
                           help="keep the result for this user (runtime/threads.py cache_path): loads on this CPU then use its best")
    args = parser.parse_args(argv)
    try:
        if args.command == "threads":
            return threads_command(args)
        from edgellm.runtime.lm import LanguageModel

        model = load(args.package, threads=args.threads, trusted_keys=args.trusted_keys)
        if args.command == "run" and isinstance(model, LanguageModel):
            model.run()  # raises: generate instead
        if args.command == "run":
            outputs = model.run(**read_inputs(model, args.input))
            if args.output:
                np.savez(args.output, **outputs)
            summary = {n: {"shape": list(a.shape), "dtype": str(a.dtype), "head": a.ravel()[:5].tolist()} for n, a in outputs.items()}
            print(json.dumps(summary, indent=2) if args.json else "\n".join(f"{n}: {v}" for n, v in summary.items()))
        elif args.command == "profile" and isinstance(model, LanguageModel):
            from edgellm.runtime.profile import format_lm_report

            report = model.profile(runs=min(args.runs, 3))
            print(json.dumps(report, indent=2) if args.json else format_lm_report(report))
        elif args.command == "profile":
            report = model.profile(runs=args.runs, warmup=args.warmup, per_op=args.per_op)
            print(json.dumps(report, indent=2) if args.json else format_report(report))
        else:
            result = model.check_reference(args.tolerance)
            floor = f", cosine {result['cosine_min']:.5f} (floor {result['min_cosine']})" if "min_cosine" in result else ""
            print(json.dumps(result, indent=2) if args.json else
                  f"{'PASS' if result['passed'] else 'FAIL'}: max error {result['max_abs']:.3g} "
                  f"({result['rel_max_abs']:.3g} of the output scale, tolerance {result['tolerance']:g}){floor}"
                  + (f": {result['problem']}" if result.get("problem") else ""))
            return 0 if result["passed"] else 1
    except EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
