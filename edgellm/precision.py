"""What each ``--precision`` means: which targets and backends can run it, and the accuracy its package promises.

    fp32   the reference arithmetic (OpenVINO pinned to f32: it would pick bf16 on CPUs that have it)
    bf16   OpenVINO's CPU plugin with INFERENCE_PRECISION_HINT=bf16, on x86 cores with avx512_bf16 or AMX; TVM's
           vdpbf16ps kernels (edgellm/backends/tvm_bf16.py) for matmuls and 1x1 convs on cores with avx512_bf16
    fp16   TVM's ToMixedPrecision (fp16 arithmetic, fp32 accumulation, fp32 in and out): NVIDIA GPUs, and
           arm64 cores with fp16 arithmetic (+fullfp16: rpi5, jetson-orin-cpu)
    int8   ``--quantize int8`` (edgellm/compress): calibrated post-training int8
    auto   every candidate the target allows, checked against fp32 on the eval set; the fastest within --max-drop

A contract is what verification (at build, ``edgellm verify``, ``python -m edgellm.runtime check``) demands of
the package's stored sample: max error relative to the output scale, a cosine floor, and top-1 agreement of the
outputs that are classifiers. It is written into the manifest (``manifest["precision"]["contract"]``).
"""

from __future__ import annotations

from edgellm.errors import EdgeError

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "auto")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of the x86 bf16 arithmetic OpenVINO uses
FP16_FLAGS = ("asimdhp", "fphp")  # arm64 HWCAP names of fp16 arithmetic (+fullfp16)

# fp16: measured (TVM, this graph compiled for x86 and for an emulated Cortex-A76): rel. error <= 2e-4, cosine >= 0.99999
FP16_CONTRACT = {"tolerance": 1e-2, "min_cosine": 0.999, "min_top1": 1.0}
# bf16 keeps 8 mantissa bits (fp16: 11): 8x the rounding of fp16; not measured here (no bf16 CPU on the build machine)
BF16_CONTRACT = {"tolerance": 5e-2, "min_cosine": 0.995, "min_top1": 1.0}


def has_bf16(target) -> bool:
    return target.arch == "x86_64" and target.tvm.get("kind") == "llvm" and any(f in target.has for f in BF16_FLAGS)


def has_fp16(target) -> bool:
    """NVIDIA GPUs, and arm64 cores whose features include fp16 arithmetic."""
    if target.tvm.get("kind") == "cuda":
        return True
    return target.arch == "aarch64" and all(f in target.has for f in FP16_FLAGS)


def backends_for(target, precision: str) -> list[str]:
    """The target's backends that can run ``precision``, in the target's order; bf16: OpenVINO first (AMX tiles
    where the core has them), then TVM where the core has AVX512-BF16 (``vdpbf16ps``, no AMX)."""
    if precision == "bf16":
        return [b for b in ("openvino", "tvm") if b in target.backends and (b == "openvino" or "avx512_bf16" in target.has)]
    able = {"fp16": ("tvm",)}.get(precision)
    return [b for b in target.backends if able is None or b in able]


def check(target, precision: str, backend: str | None = None) -> None:
    """One EdgeError line when ``target`` (with ``backend``, when one is forced) cannot run ``precision``."""
    if precision not in PRECISIONS:
        raise EdgeError(f"unknown precision {precision!r}", f"use one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and not has_bf16(target):
        raise EdgeError(f"target {target.name} cannot run bf16: its CPU features lack {' / '.join(BF16_FLAGS)}",
                        "use --precision fp32 or int8 here, or --target x86_64-amx for a CPU with AMX / AVX512-BF16 (Sapphire Rapids on)")
    if precision == "fp16" and not has_fp16(target):
        why = ("edgellm's fp16 is for NVIDIA GPUs and arm64 cores with fp16 arithmetic" if target.arch == "x86_64"
               else f"its core lacks fp16 arithmetic ({' / '.join(FP16_FLAGS)}, +fullfp16)")
        raise EdgeError(f"target {target.name} cannot run fp16: {why}",
                        "use --precision fp32 or int8 here" + (" (bf16 on x86_64-amx)" if target.arch == "x86_64" else "")
                        + ", or build fp16 for rpi5, jetson-orin-cpu or a cuda-sm* / jetson-orin target")
    if precision in ("bf16", "fp16") and backend not in (None, "default", "auto") and backend not in backends_for(target, precision):
        able = backends_for(target, precision)
        raise EdgeError(f"the {backend} backend has no {precision} for {target.name}",
                        f"use --backend {able[0]}" if able else f"no backend of {target.name} runs {precision}")


def candidates(target, backends: list[str]) -> list[tuple[str, str]]:
    """(backend, precision) pairs ``--precision auto`` builds for ``target``: fp32 and int8 with every backend,
    bf16 / fp16 where the target has them; fp32 first (the reference the others are compared with)."""
    out = [(b, "fp32") for b in backends]
    for precision, target_has in (("bf16", has_bf16), ("fp16", has_fp16)):
        if target_has(target):
            out += [(b, precision) for b in backends if b in backends_for(target, precision)]
    return out + [(b, "int8") for b in backends]


def contract(precision: str, tolerance: float, outputs: list | None = None) -> dict:
    """What verification demands of a ``precision`` package; ``tolerance`` is the build's (int8: already widened).
    ``outputs``: the traced output specs, for the top-1 check of classifier outputs."""
    floor = {"fp16": FP16_CONTRACT, "bf16": BF16_CONTRACT}.get(precision)
    if floor is None:
        return {"tolerance": tolerance}
    from edgellm.compress.evaluate import output_kind

    top1 = [s.name for s in outputs or [] if output_kind(s.shape, s.name) == "classifier"]
    return {"tolerance": max(tolerance, floor["tolerance"]), "min_cosine": floor["min_cosine"],
            **({"min_top1": floor["min_top1"], "top1_outputs": top1} if top1 else {})}


AUTO_MAX_DROP = 1.0  # --precision auto without --max-drop: percentage points of top-1 (classifiers) or cosine


def choose(trials: list[dict], max_drop: float | None, target: str, threads: int) -> tuple[dict, dict]:
    """The candidate to package and the comparison for the manifest (``precision_choice``): the fastest
    candidate that passed verification and drops at most ``max_drop`` vs fp32 on the eval set. When this
    machine cannot run the target's code nothing is measured, and fp32 is kept (its accuracy is the reference)."""
    budget = AUTO_MAX_DROP if max_drop is None else max_drop
    timed = [t for t in trials if "p50_ms" in t]
    ok = [t for t in timed if t.get("drop_pp", 0.0) <= budget]
    if ok:
        chosen = min(ok, key=lambda t: t["p50_ms"])
        why = f"fastest within --max-drop {budget:g} pp, measured here"
    else:
        built = [t for t in trials if "compiled" in t and t["verification"]["status"] in ("passed", "skipped")]
        fp32 = [t for t in built if t["precision"] == "fp32"]
        if not fp32:
            raise EdgeError("no --precision auto candidate built and matched the fp32 reference ("
                            + "; ".join(f"{t['backend']} {t['precision']}: {t.get('error') or t['verification'].get('problem')}" for t in trials if t not in built) + ")",
                            "build with --precision fp32 and --verbose to see why")
        chosen = fp32[0]
        why = (f"nothing within --max-drop {budget:g} pp: fp32 kept" if timed else
               f"not measured: this machine cannot run {target}'s code, so fp32 is kept (run auto on the device, or pick --precision)")
    base = {t["backend"]: t["p50_ms"] for t in timed if t["precision"] == "fp32"}  # p50_vs_fp32: vs the same backend's fp32
    table = []
    for t in trials:
        row = {"backend": t["backend"], "precision": t["precision"]}
        if "p50_ms" in t:
            row["p50_ms"] = round(t["p50_ms"], 4)
            if t["backend"] in base:
                row["p50_vs_fp32"] = round(t["p50_ms"] / base[t["backend"]], 3)
        if "evaluation" in t:
            worst = max(t["evaluation"]["outputs"].values(), key=lambda o: o["drop_pp"])
            row.update(drop_pp=round(t["drop_pp"], 4), cosine_mean=worst["cosine_mean"], rel_max_abs=worst["rel_max_abs"],
                       **({"top1": worst["top1"]} if "top1" in worst else {}))
        if "error" in t:
            row.update(status="failed", error=t["error"])
        elif t["verification"]["status"] == "failed":
            row.update(status="failed verification", error=t["verification"].get("problem"))
        elif t is chosen:
            row["status"] = "chosen"
        elif "p50_ms" not in t:
            row["status"] = "not measured"
        else:
            row["status"] = "within budget" if t.get("drop_pp", 0.0) <= budget else "over budget"
        table.append(row)
    return chosen, {"chosen": {"backend": chosen["backend"], "precision": chosen["precision"]}, "why": why,
                    "max_drop": budget, "measured": bool(timed), "threads": threads, "trials": table}


def summary(choice: dict) -> str:
    """One line per candidate, for the build's progress."""
    lines = []
    for t in choice["trials"]:
        figures = [f"p50 {t['p50_ms']:.3f} ms" + (f" ({t['p50_vs_fp32']:.2f}x fp32)" if "p50_vs_fp32" in t else "")] if "p50_ms" in t else []
        if "drop_pp" in t:
            figures.append(f"drop {t['drop_pp']:.2f} pp")
        lines.append(f"{t['backend']:>8} {t['precision']:<5} {t['status']:<14} {', '.join(figures) or t.get('error') or ''}")
    return "\n           ".join(lines)
