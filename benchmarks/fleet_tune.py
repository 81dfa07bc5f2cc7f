"""Tuning on a device through the fleet: kws-cnn for rpi4, candidates measured on an emulated rpi4 agent.

Starts TVM's tracker and an emulated Cortex-A72 agent (the Debian arm64 userland under qemu-user) on loopback,
builds kws-cnn for rpi4 with edgellm's rules alone and again with ``--tune N --remote tracker/rpi4``, and profiles
both packages on that agent. Emulated time is not device speed (qemu translates every instruction): the
before/after ratio says what the tuner measured there, not what a Raspberry Pi will do.

    python benchmarks/fleet_tune.py [--trials 16] [--runs 50] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3, help="alternating profile blocks per package; the best p50 of each is kept")
    parser.add_argument("--target", default="rpi4")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from edgellm import api
    from edgellm.fleet import launch, remote

    tracker = remote.start_tracker("127.0.0.1", 9290, 9390)
    where = f"127.0.0.1:{tracker.port}"
    agent = launch.start_agent(where, args.target, emulate=args.target, host="127.0.0.1", port=9400)
    try:
        deadline = time.time() + 60
        while remote.devices("127.0.0.1", tracker.port)["keys"].get(args.target, {}).get("free", 0) < 1 and time.time() < deadline:
            time.sleep(0.5)
        with tempfile.TemporaryDirectory(prefix="edgellm-fleet-tune-") as tmp:
            rules = api.build("zoo:kws-cnn", args.target, Path(tmp) / "rules.edgepkg")
            t0 = time.time()
            tuned = api.build("zoo:kws-cnn", args.target, Path(tmp) / "tuned.edgepkg", tune=args.trials,
                              tuning_db=str(Path(tmp) / "db"), tune_remote=f"{where}/{args.target}")
            tune_s = time.time() - t0
            key = remote.Remote("127.0.0.1", tracker.port, args.target)
            rounds = {"rules": [], "tuned": []}  # alternating blocks: a busy host slows both alike
            for _ in range(args.rounds):
                for name, pkg in (("rules", rules.path), ("tuned", tuned.path)):
                    rounds[name].append(remote.run_remote(pkg, key, options={"runs": args.runs, "warmup": 5})[0])
            before, after = (min(rounds[n], key=lambda r: r.get("latency_ms", {}).get("p50", float("inf"))) for n in ("rules", "tuned"))
    finally:
        agent.stop()
        tracker.terminate()
    tuning = tuned.manifest["backend"].get("tuning", {})
    result = {"model": "kws-cnn", "target": args.target, "device": after.get("device", {}).get("emulated"), "trials": tuning.get("trials"),
              "tasks": tuning.get("tasks"), "tuned_tasks": tuning.get("tuned"), "tuning_s": tuning.get("seconds"), "build_s": round(tune_s, 1),
              "p50_ms_rules": before.get("latency_ms", {}).get("p50"), "p50_ms_tuned": after.get("latency_ms", {}).get("p50"),
              "errors": [r["error"] for r in (before, after) if "error" in r]}
    if result["p50_ms_rules"] and result["p50_ms_tuned"]:
        result["tuned_over_rules"] = result["p50_ms_tuned"] / result["p50_ms_rules"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"kws-cnn for {args.target}, tuned on the emulated agent ({result['device']}; emulated time is not device speed)")
        print(f"  {result['trials']} trials over {result['tasks']} tasks ({result['tuned_tasks']} tuned) in {result['tuning_s']} s "
              f"(build {result['build_s']} s)")
        print(f"  p50 on the agent: rules {result['p50_ms_rules']:.3f} ms, tuned {result['p50_ms_tuned']:.3f} ms"
              f" ({result.get('tuned_over_rules', float('nan')):.2f}x)")
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
