"""How many threads one call of a package uses: measured where it can be, the physical cores otherwise.

A record of a measurement (``edgellm.threads/1``)::

    {"cpu": "AMD EPYC 7763 64-Core Processor", "cores": 8, "p50_ms": {"1": 4.1, "2": 2.3, "4": 1.4, "8": 1.3}, "best": 4}

``cores`` is :func:`device.physical_cores` where it was measured. A record applies only on a machine with the same
CPU model and the same core count: the build writes one into the manifest when the build machine ran the package,
and ``python -m edgellm.runtime threads PKG --save`` keeps one per user (the package itself is signed and hashed: a
device never rewrites it). Choosing (:func:`choose`): ``threads=`` given, else a saved record for this machine, else
the manifest's, else the physical cores.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from edgellm.runtime import device

SCHEMA = "edgellm.threads/1"
# the fewest threads within this share of the fastest count is "best": the rest are noise on a busy machine,
# and fewer threads leave cores for concurrent callers
WITHIN = 0.05
BLOCK_S = 0.25  # a timed block's length at one thread, at most (see measure)


def counts(cores: int | None = None) -> list[int]:
    """Thread counts worth timing: powers of two below ``cores``, and ``cores`` itself (1, 2, 4, 6 for 6 cores)."""
    cores = max(1, cores or device.physical_cores())
    out = [1]
    while out[-1] * 2 < cores:
        out.append(out[-1] * 2)
    return out + ([cores] if cores > 1 else [])


def best_of(p50_ms: dict) -> int:
    """The fewest threads whose p50 is within WITHIN of the fastest."""
    fastest = min(p50_ms.values())
    return min(int(k) for k, v in p50_ms.items() if v <= fastest * (1 + WITHIN))


def record(p50_ms: dict, work: str) -> dict:
    """A record of ``{threads: p50 ms}`` timed on this machine; ``work``: what one timed call did."""
    table = {str(k): float(v) for k, v in sorted(p50_ms.items(), key=lambda kv: int(kv[0]))}
    return {"schema": SCHEMA, "cpu": device.cpu_model(), "cores": device.physical_cores(), "work": work, "p50_ms": table,
            "best": best_of(table)}


def measure(make_run: Callable[[int], Callable[[], object]], work: str, threads: list[int] | None = None, blocks: int = 6,
            per_block: int = 15, warmup: int = 5) -> dict:
    """Time one call at each thread count (``make_run(k)``: a zero-argument call using k threads), in alternating
    blocks in this process (``profile.side_by_side``: drift hits every count alike), and return the record. A slow
    call gets shorter blocks (at least 3 calls; about BLOCK_S each at the fewest threads): MobileNet-V2 on 2 cores
    takes 3 s in all, a 100 ms model would otherwise take 20 s per count."""
    from edgellm.runtime.profile import side_by_side, time_runs

    runners = {k: make_run(k) for k in threads or counts()}
    one_call = min(time_runs(runners[min(runners)], 2, warmup=1))  # the slowest count, warm
    per_block = max(3, min(per_block, int(BLOCK_S / max(one_call, 1e-9))))
    return record(side_by_side(runners, blocks=blocks, per_block=per_block, warmup=warmup), work)


MODEL_WORK = "one call on the package's sample"
# one thread count serves both phases: the prompt's prefill (compute-bound: more cores help) and decode (memory-bound:
# they stop helping early). A turn of a chat is both, so the timed work is too: timed on decode alone, SmolLM2-135M
# chose 1 thread, which halves its prefill
LM_PROMPT, LM_NEW = 32, 16
LM_WORK = f"prefill of a {LM_PROMPT}-token prompt, then greedy decode of {LM_NEW} tokens"


def measure_lm(lm, threads: list[int] | None = None) -> dict:
    """A language model's record: a short chat turn (prefill + decode) per call. One loaded model (the weights
    once), its TVM pool resized per count; 3 blocks of 3 turns per count."""
    from edgellm.runtime.engines.tvm import PoolSizer

    prompt = [i % lm.config["vocab"] for i in range(1, LM_PROMPT + 1)]
    kept = lm._size_pool

    def make_run(k: int):
        sizer = PoolSizer(lm._tvm, k)

        def run():
            lm._size_pool = sizer
            lm.reset()
            lm.generate(prompt, LM_NEW, ignore_eos=True)

        return run

    try:
        with lm._lock:
            return measure(make_run, LM_WORK, threads, blocks=3, per_block=3, warmup=1)
    finally:
        lm._size_pool = kept
        lm.reset()


def summary(rec: dict) -> str:
    """One line: "p50 ms by threads: 1: 0.150, 2: 0.081 -> 2 (AMD EPYC, 2 cores)"."""
    table = ", ".join(f"{k}: {v:.3f}" for k, v in rec["p50_ms"].items())
    return f"p50 ms by threads: {table} -> {rec['best']} ({rec['cpu']}, {rec['cores']} cores)"


def matches(rec, cpu: str | None = None, cores: int | None = None) -> bool:
    """Whether ``rec`` is a well-formed record made on a CPU like this one (same model, same physical cores)."""
    return (isinstance(rec, dict) and isinstance(rec.get("best"), int) and rec["best"] >= 1
            and rec.get("cpu") == (cpu if cpu is not None else device.cpu_model())
            and rec.get("cores") == (cores if cores is not None else device.physical_cores()))


def package_key(manifest: dict) -> str:
    """What identifies a package's code for the cache: the sha256 of its members' hashes (a rebuild with other code is
    another key; the same package copied or renamed is the same one)."""
    files = {name: meta.get("sha256") for name, meta in sorted((manifest.get("files") or {}).items())}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def cache_path() -> Path:
    """$EDGELLM_CACHE/threads.json, else $XDG_CACHE_HOME/edgellm/threads.json, else ~/.cache/edgellm/threads.json."""
    root = os.environ.get("EDGELLM_CACHE")
    if root:
        return Path(root) / "threads.json"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgellm" / "threads.json"


def _read_cache() -> dict:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):  # none yet, unreadable or corrupt: as if empty
        return {}
    return data if isinstance(data, dict) else {}


def _cache_key(manifest: dict, rec: dict) -> str:
    return f"{package_key(manifest)} {rec['cpu']} {rec['cores']}"


def saved(manifest: dict) -> dict | None:
    """The record saved on this machine for this package, if any."""
    rec = _read_cache().get(_cache_key(manifest, {"cpu": device.cpu_model(), "cores": device.physical_cores()}))
    return rec if matches(rec) else None


def save(manifest: dict, rec: dict) -> Path:
    """Keep ``rec`` for this package in the per-user cache (written whole to a temporary file, then renamed)."""
    from edgellm.errors import EdgeError

    path = cache_path()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({**_read_cache(), _cache_key(manifest, rec): rec}, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise EdgeError(f"cannot save the thread measurement to {path} ({e.strerror or e})",
                        "set EDGELLM_CACHE to a writable folder") from None
    return path


def choose(manifest: dict, threads: int | None = None) -> tuple[int, str]:
    """(threads, where the number came from): ``threads`` given; else a record for this CPU, saved here or in the
    manifest; else the physical cores (:func:`device.physical_cores`)."""
    if threads:
        return int(threads), "given"
    rec = saved(manifest)
    if rec:
        return rec["best"], f"measured on this CPU ({cache_path()})"
    rec = manifest.get("threads")
    if matches(rec):
        return rec["best"], "measured on this CPU at build time"
    return device.physical_cores(), "physical cores"
