"""``edgellm serve`` under load: requests/s, p50 and p99 latency and errors for N concurrent clients, per package.

The server runs in a subprocess on loopback (``edgellm serve --port 0 --json``). Each client is a thread with its own
HTTP connection (httpx) sending the package's reference sample back to back for ``--seconds``, over KServe v2 with
Triton's binary tensors (what tritonclient sends); latency is per request, seen by the client. Clients and server
share the machine: on a few cores the clients take CPU from the server, so the figures are a floor. Figures, not asserts.

    flock /tmp/edgellm-bench.lock python benchmarks/load.py [--packages kws=a.edgepkg,minilm=b.edgepkg] [--clients 1,4,16] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ZOO = {"kws-cnn": "zoo:kws-cnn", "minilm": "zoo:minilm"}
DATATYPES = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32", "uint8": "UINT8", "int8": "INT8", "bool": "BOOL"}


def packages(spec: str | None, build_dir: Path) -> dict[str, Path]:
    """NAME=PKG pairs, or kws-cnn and MiniLM built for this machine (once: kept in build_dir)."""
    if spec:
        return {name: Path(path) for name, _, path in (item.partition("=") for item in spec.split(","))}
    from edgellm import api

    build_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, source in ZOO.items():
        path = build_dir / f"{name}.edgepkg"
        if not path.exists():
            api.build(source, "host", path)
        out[name] = path
    return out


def binary_request(inputs: dict[str, np.ndarray]) -> tuple[bytes, dict]:
    """A KServe v2 request with Triton's binary tensor data: JSON header, then the raw tensors."""
    head = {"inputs": [{"name": n, "shape": list(a.shape), "datatype": DATATYPES[str(a.dtype)],
                        "parameters": {"binary_data_size": a.nbytes}} for n, a in inputs.items()],
            "parameters": {"binary_data_output": True}}
    header = json.dumps(head).encode()
    body = header + b"".join(np.ascontiguousarray(a).tobytes() for a in inputs.values())
    return body, {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}


def first_output(response) -> np.ndarray:
    n = int(response.headers["inference-header-content-length"])
    out = json.loads(response.content[:n])["outputs"][0]
    dtype = {v: k for k, v in DATATYPES.items()}[out["datatype"]]
    return np.frombuffer(response.content[n:n + out["parameters"]["binary_data_size"]], dtype).reshape(out["shape"])


def drive(url: str, name: str, body: bytes, headers: dict, clients: int, seconds: float) -> dict:
    """``clients`` threads, each sending back to back until the deadline: req/s, latency percentiles, errors."""
    import httpx

    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    deadline = [0.0]
    start = threading.Barrier(clients + 1, action=lambda: deadline.__setitem__(0, time.perf_counter() + seconds))  # all warm: go

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            http.post(f"/v2/models/{name}/infer", content=body, headers=headers)  # connect and warm up, untimed
            start.wait()
            while time.perf_counter() < deadline[0]:
                t0 = time.perf_counter()
                try:
                    ok = http.post(f"/v2/models/{name}/infer", content=body, headers=headers).status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies[i].append(time.perf_counter() - t0)
                errors[i] += not ok

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    lat = np.asarray([x for per in latencies for x in per]) * 1e3
    return {"model": name, "clients": clients, "requests": int(lat.size), "seconds": elapsed, "req_s": lat.size / elapsed,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)), "errors": int(sum(errors))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", help="NAME=PKG,NAME=PKG [default: kws-cnn and minilm, built for this machine]")
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients, comma-separated")
    parser.add_argument("--seconds", type=float, default=5.0, help="per (model, clients) row")
    parser.add_argument("--threads", type=int, default=None, help="the server's CPU threads per model [default: all cores]")
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build" / "load")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args()

    import edgellm.runtime as rt

    pkgs = packages(args.packages, args.build_dir)
    cmd = [sys.executable, "-m", "edgellm", "serve", *(f"{n}={p}" for n, p in pkgs.items()), "--port", "0", "--json"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = server.stdout.readline()
        if not line:
            print("error: edgellm serve did not start", file=sys.stderr)
            return 1
        url = json.loads(line)["url"]
        import httpx

        rows = []
        load_before = os.getloadavg()
        for name, path in pkgs.items():
            model = rt.load(path, threads=1)
            sample = model.example_inputs()
            body, headers = binary_request(sample)
            reply = httpx.post(f"{url}/v2/models/{name}/infer", content=body, headers=headers, timeout=60)
            expected = next(iter(model.run(**sample).values()))
            if reply.status_code != 200 or not np.allclose(first_output(reply), expected, atol=1e-5):
                print(f"error: {name}: the server's answer is not the package's ({reply.status_code} {reply.text[:200]})", file=sys.stderr)
                return 1
            for n in (int(c) for c in args.clients.split(",")):
                rows.append(drive(url, name, body, headers, n, args.seconds))
        report = {"schema": "edgellm.load/1", "url": url, "cpus": os.cpu_count(), "server_threads": args.threads,
                  "seconds_per_row": args.seconds, "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "rows": rows}
    finally:
        server.terminate()
        server.wait(timeout=30)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{'model':<10} {'clients':>7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
        for r in rows:
            print(f"{r['model']:<10} {r['clients']:>7} {r['req_s']:>9.1f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['errors']:>6}")
        print(f"{report['cpus']} CPUs, load average {load_before[0]:.2f} before, {report['loadavg_after'][0]:.2f} after "
              "(clients and server share the machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
