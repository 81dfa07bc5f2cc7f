"""A loaded package: numpy in, numpy out, with its own profiler."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgellm.errors import EdgeError
from edgellm.runtime import device, engines
from edgellm.runtime.package import check_device, load_npz, read_package
from edgellm.runtime.threads import choose as choose_threads

REFERENCE = "reference.npz"


class InputError(EdgeError):
    """The inputs given to a model do not match what it was built for."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype}[{', '.join(map(str, self.shape))}]"


def _specs(items: list[dict]) -> list[TensorSpec]:
    return [TensorSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in items]


class Model:
    """A verified package, ready to run on this machine."""

    def __init__(self, path: str | Path, threads: int | None = None, concurrency: int | None = None, trusted_keys=None):
        """``threads``: cores one call uses (default: the count measured fastest on this CPU, else the physical cores;
        see runtime/threads.py; ``threads_from`` says which). ``concurrency``: calls that may run at once
        (default: cores / threads, so concurrent callers never oversubscribe the cores). ``trusted_keys``: .pub paths
        or hex keys; the package must be signed by one (see runtime/package.py)."""
        t0 = time.perf_counter()
        self.path = Path(path)
        self.manifest, members = read_package(self.path, trusted_keys)
        check_device(self.manifest, device.cpu_flags())
        self.inputs = _specs(self.manifest["inputs"])
        self.outputs = _specs(self.manifest["outputs"])
        self.threads, self.threads_from = choose_threads(self.manifest, threads)
        self._reference = load_npz(members[REFERENCE]) if REFERENCE in members else None
        self._engine = engines.get(self.manifest["backend"]["name"])(self.manifest, members, self.threads)
        # callers beyond what the cores hold wait here instead of oversubscribing them: with 2 threads a call on
        # 2 cores, 8 callers at once ran MiniLM at 0.44x one caller's throughput
        self.concurrency = int(concurrency or max(1, device.cpu_count() // self.threads))
        self._slots = threading.BoundedSemaphore(self.concurrency)
        self.load_ms = (time.perf_counter() - t0) * 1e3
        self.first_inference_ms: float | None = None

    def __repr__(self) -> str:
        ins = ", ".join(map(str, self.inputs))
        outs = ", ".join(map(str, self.outputs))
        return f"<edgellm Model {self.path.name} ({ins}) -> ({outs}) on {self.manifest['target']['name']}>"

    def _arrange(self, args: tuple, kwargs: dict) -> list[np.ndarray]:
        """Inputs in model order, checked for count, names, shapes and dtypes."""
        expected = [s.name for s in self.inputs]
        if args and kwargs:
            raise InputError("give inputs either by position or by name, not both")
        if kwargs:
            unknown = sorted(set(kwargs) - set(expected))
            if unknown:
                raise InputError(f"unknown input {unknown[0]!r}", f"the model's inputs are {', '.join(expected)}")
            missing = [n for n in expected if n not in kwargs]
            if missing:
                raise InputError(f"missing input {missing[0]!r}", f"the model's inputs are {', '.join(expected)}")
            args = tuple(kwargs[n] for n in expected)
        if len(args) != len(expected):
            raise InputError(f"the model takes {len(expected)} input(s) ({', '.join(expected)}), got {len(args)}")
        arrays = []
        for spec, value in zip(self.inputs, args):
            array = np.asarray(value)
            if array.shape != spec.shape:
                raise InputError(f"input {spec.name!r} has shape {list(array.shape)}, the model expects {list(spec.shape)}")
            if array.dtype != np.dtype(spec.dtype):
                raise InputError(
                    f"input {spec.name!r} has dtype {array.dtype}, the model expects {spec.dtype}",
                    f"cast it with .astype('{spec.dtype}')",
                )
            arrays.append(np.ascontiguousarray(array))
        return arrays

    def run(self, *args, **kwargs) -> dict[str, np.ndarray]:
        """Outputs by name. Safe to call from several threads at once: up to ``concurrency`` calls (cores / threads)
        run side by side, each in its own engine session; the rest wait their turn."""
        arrays = self._arrange(args, kwargs)
        with self._slots:
            t0 = time.perf_counter()
            outs = self._engine.run(arrays)
        if self.first_inference_ms is None:
            self.first_inference_ms = (time.perf_counter() - t0) * 1e3
        return {spec.name: out for spec, out in zip(self.outputs, outs)}

    def __call__(self, *args, **kwargs):
        """One output: the array; several: a tuple in manifest order."""
        outs = list(self.run(*args, **kwargs).values())
        return outs[0] if len(outs) == 1 else tuple(outs)

    def example_inputs(self) -> dict[str, np.ndarray]:
        """The sample inputs stored in the package at build time (float16 there when exact: cast back)."""
        if self._reference is None:
            raise EdgeError(f"{self.path.name} carries no reference sample", "rebuild it with this edgellm")
        return {s.name: self._reference[f"input.{s.name}"].astype(s.dtype, copy=False) for s in self.inputs}

    def contract(self) -> dict:
        """The accuracy the build promised (edgellm/precision.py): max error relative to the output scale (1e-4 for
        fp32, looser for int8 / fp16 / bf16), and for fp16 / bf16 a cosine floor and top-1 agreement of classifiers.
        Packages before ``manifest["precision"]`` keep theirs in the verification record."""
        verification = self.manifest.get("verification") or {}
        stored = (self.manifest.get("precision") or {}).get("contract") or verification
        tolerance = stored.get("tolerance", self.manifest.get("recipe", {}).get("tolerance", 1e-4))
        keys = ("min_cosine", "small_scale_min_cosine", "min_top1", "top1_outputs")
        return {"tolerance": float(tolerance), **{k: stored[k] for k in keys if k in stored},
                **({"small_scale_min_cosine": verification["small_scale_min_cosine"]} if "small_scale_min_cosine" in verification else {})}

    def check_reference(self, tolerance: float | None = None) -> dict:
        """Run the stored sample and compare with the fp32 reference outputs stored beside it.

        ``tolerance`` None: the package's own contract (:meth:`contract`)."""
        from edgellm.runtime.accuracy import compare, meets

        got = self.run(**self.example_inputs())
        stats = {name: compare(self._reference[f"output.{name}"], got[name]) for name in got}
        worst = max(stats.values(), key=lambda s: s["rel_max_abs"])
        contract = {**self.contract(), **({"tolerance": tolerance} if tolerance is not None else {})}
        passed, problem = meets(stats, contract)
        return {"outputs": stats, "rel_max_abs": worst["rel_max_abs"], "max_abs": worst["max_abs"],
                "cosine_min": min(s["cosine"] for s in stats.values()), **contract, "passed": passed, "problem": problem}

    def generate(self, *args, **kwargs):
        raise EdgeError(f"{self.path.name} is not a language model", "call run() or the model itself; build a .gguf or transformers folder for generate()")

    stream = chat = generate

    def profile(self, runs: int = 100, warmup: int = 10, per_op: bool = False, inputs: dict | None = None) -> dict:
        """Latency figures in the ``edgellm.profile/1`` schema (docs/profile-schema.md)."""
        from edgellm.runtime.profile import profile

        return profile(self, runs=runs, warmup=warmup, per_op=per_op, inputs=inputs)


def load(path: str | Path, threads: int | None = None, concurrency: int | None = None, trusted_keys=None):
    """Verify a package (checksums, format, architecture, CPU features; with ``trusted_keys`` or $EDGELLM_TRUSTED_KEYS,
    its signature) and load it: a :class:`Model`, or a :class:`edgellm.runtime.lm.LanguageModel` for a language-model
    package (one generation at a time: the others wait for the KV cache)."""
    from edgellm.runtime.package import read_manifest

    if read_manifest(path).get("kind") == "llm":
        from edgellm.runtime.lm import LanguageModel

        return LanguageModel(path, threads=threads, trusted_keys=trusted_keys)
    return Model(path, threads=threads, concurrency=concurrency, trusted_keys=trusted_keys)
