"""Run an OpenVINO IR (model.xml + model.bin) with OpenVINO's runtime on the CPU, f32.

Only ``openvino.Core`` and its tensors are used: never the converter (openvino.tools.ovc, which
``import openvino`` loads by itself but this module does not call) nor the torch/ONNX frontends; only
OpenVINO's IR reader and CPU plugin get mapped. The compiled model is kept in OpenVINO's model cache
(CACHE_DIR; the key covers the IR, the weights and the config), so a second load of the same
package skips the CPU plugin's compilation.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgellm.errors import EdgeError
from edgellm.runtime.engines import Pool

DEFAULT_VERSION = "2026.4.1"


def _required_version(manifest: dict) -> str:
    for req in manifest.get("runtime_requires") or []:
        if req.replace(" ", "").startswith("openvino=="):
            return req.split("==", 1)[1].strip()
    return manifest.get("backend", {}).get("openvino") or DEFAULT_VERSION


def import_openvino(manifest: dict):
    try:
        import openvino
    except ImportError:
        version = _required_version(manifest)
        raise EdgeError(f"this package needs OpenVINO's runtime (openvino=={version})", f"pip install openvino=={version}") from None
    return openvino


def cache_dir() -> str | None:
    """OpenVINO's model cache: $EDGELLM_CACHE/ov-cache, else ~/.cache/edgellm/ov-cache; None if it cannot be made."""
    root = os.environ.get("EDGELLM_CACHE")
    path = Path(root) / "ov-cache" if root else Path.home() / ".cache" / "edgellm" / "ov-cache"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return str(path) if os.access(path, os.W_OK) else None


class Engine:
    def __init__(self, manifest: dict, members: dict[str, bytes], threads: int):
        ov = import_openvino(manifest)
        info = manifest["backend"]
        self._ov = ov
        self.threads = int(threads)
        self.core = ov.Core()
        self._xml = members[info.get("model", "model.xml")].decode()
        self._weights = members[info.get("weights", "model.bin")]
        self.config = {
            "INFERENCE_NUM_THREADS": self.threads,
            "INFERENCE_PRECISION_HINT": info.get("precision", "f32"),
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        cache = cache_dir()
        if cache:
            self.config["CACHE_DIR"] = cache
        self.device = info.get("device", "CPU")
        self._version = _required_version(manifest)
        self.compiled = self._compile(self.config)
        self._requests = Pool(self.compiled.create_infer_request)  # one infer request per concurrent caller
        self._inputs = self._ports(self.compiled.inputs, info.get("input_names"))
        self._outputs = self._ports(self.compiled.outputs, info.get("output_names"))
        self._profiled = None  # (compiled model, request) with PERF_COUNT on, made on first op_times

    def _compile(self, config: dict):
        """Compile the IR straight from memory: with CACHE_DIR set, a cached blob is found without
        building an ov.Model first (read_model + compile_model is about 1.5x slower on a cache hit)."""
        try:
            return self.core.compile_model(self._xml, self.device, config, weights=self._weights)
        except Exception as e:
            raise EdgeError(f"OpenVINO cannot load the package's IR for {self.device} ({str(e).strip().splitlines()[-1][:300]})",
                            f"install the OpenVINO it was built with: pip install openvino=={self._version}") from None

    @staticmethod
    def _ports(ports, names: list[str] | None) -> list[int]:
        """IR port indices in manifest order: by the names the backend wrote into the IR, else IR order."""
        ports = list(ports)
        order = list(range(len(ports)))
        if not names:
            return order
        by_name: dict[str, int] = {}
        for i, port in enumerate(ports):
            for name in port.get_names():
                by_name.setdefault(name, i)
        if all(n in by_name for n in names):
            return [by_name[n] for n in names]
        if len(names) != len(ports):
            raise EdgeError(f"the package's IR has {len(ports)} ports where its manifest names {len(names)}", "build the package again")
        return order

    def _infer(self, request, arrays: list[np.ndarray]) -> None:
        for index, array in zip(self._inputs, arrays):
            request.set_input_tensor(index, self._ov.Tensor(np.ascontiguousarray(array), shared_memory=True))
        request.infer()

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Thread-safe: an infer request runs one inference at a time ("Infer Request is busy"), so each concurrent
        caller takes its own from a pool; they share the compiled model, which runs them side by side."""
        with self._requests.take() as request:
            self._infer(request, arrays)
            return [request.get_output_tensor(index).data.copy() for index in self._outputs]

    def op_times(self, arrays: list[np.ndarray], runs: int) -> list[tuple[str, float]]:
        """Seconds per executed OpenVINO CPU node (real time), over ``runs`` runs.

        Counting needs a model compiled with PERF_COUNT on; it is compiled on first use, so
        ``run`` keeps the model without counters.
        """
        if self._profiled is None:
            compiled = self._compile({**self.config, "PERF_COUNT": True})
            self._profiled = compiled, compiled.create_infer_request()
        _, request = self._profiled
        executed = self._ov.ProfilingInfo.Status.EXECUTED
        events: list[tuple[str, float]] = []
        for _ in range(runs):
            self._infer(request, arrays)
            for node in request.profiling_info:
                if node.status == executed:
                    events.append((f"{node.node_type}:{node.node_name}", node.real_time.total_seconds()))
        return events
