#!/usr/bin/env bash
# GPU check for edgellm's CUDA targets: accuracy and speed of CUDA packages on a real NVIDIA GPU.
#
# Two halves, two machines:
#
# 1. HERE (the build machine: edgellm installed, nvcc, network to PyPI; no GPU needed):
#
#      bash scripts/gpu_check.sh build [-t cuda-sm90] [-p 3.12] [-o build/gpu-check-cuda-sm90] [-m "kws-cnn mobilenet-v2 minilm"]
#
#    builds every zoo model for the cuda target (kernels compiled to a fatbin for its sm_XX),
#    writes the runtime bundle for the device (edgellm.runtime + pruned TVM runtime wheels that
#    keep tvm/lib/libtvm_runtime_cuda.so, + nvidia-cuda-runtime's libcudart.so.13) for CPython
#    3.12 on the target's CPU arch, a torch.export program (.pt2, TorchScript .ts as fallback) of
#    each model for the PyTorch baseline, and a copy of this script. Copy the folder (or the
#    .tar.gz next to it) to the GPU machine.
#
# 2. THERE (the GPU machine: NVIDIA driver >= 580 (CUDA 13), Python 3.12 with torch (CUDA build),
#    no TVM, no edgellm, no network):
#
#      bash gpu_check.sh run [--runs 500] [--python python3.12]      # inside the copied folder
#
#    for each package, with PYTHONPATH=runtime only:
#      python -m edgellm.runtime check PKG --json       accuracy vs the fp32 reference stored in the package
#      python -m edgellm.runtime profile PKG --runs 500 latency (the GPU is synchronized per inference)
#    Packages: each model at batch 1 and 32, fp32 and --fp16 (NAME[-b32][-fp16].edgepkg).
#    then PyTorch eager on the same GPU at the same batch and precision (fp16 packages vs module.half()) with
#    the same input: p50 with the input already on
#    the GPU (kernels only) and p50 with the host->GPU copy and GPU->host copy included (what
#    edgellm's run() does: numpy in, numpy out). Prints a table, writes results.json, and exits 1
#    if a package fails its accuracy check (the package's own contract: error <= 1e-4 of the output scale
#    for fp32; <= 1e-2 and cosine >= 0.999 for fp16) or cannot load.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed 's/^# \{0,1\}//;/^set -euo/d'; exit 2; }
mode=${1:-}; [[ $# -gt 0 ]] && shift
here=$(cd "$(dirname "$0")" && pwd)

case "$mode" in
build)
  target=cuda-sm90 py=3.12 out="" models="kws-cnn mobilenet-v2 minilm"
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -t) target=$2; shift 2 ;; -p) py=$2; shift 2 ;; -o) out=$2; shift 2 ;; -m) models=$2; shift 2 ;; *) usage ;;
    esac
  done
  out=${out:-build/gpu-check-$target}
  PY=${PY:-python3}
  if [[ -e "$out" ]]; then echo "gpu_check: $out exists; remove it or pass -o NEW" >&2; exit 2; fi
  mkdir -p "$(dirname "$out")"
  tmp="$out.tmp"; rm -rf "$tmp"; mkdir -p "$tmp/packages" "$tmp/torch"
  "$PY" - "$target" "$py" "$tmp" $models <<'EOF'
import json, sys, time
from pathlib import Path
import torch
from edgellm import api, targets, zoo
from edgellm.bundle import bundle_runtime

target, py, out, models = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4:]
t = targets.resolve(target)
if t.tvm.get("kind") != "cuda":
    sys.exit(f"gpu_check: {target} is not a cuda target")
builds = {}
for name in models:
    spec = zoo.build(name)
    for batch in (1, 32):
        args = tuple(v.repeat(batch, *[1] * (v.dim() - 1)) for v in spec.inputs.values())
        shapes = [f"{k}={'x'.join(map(str, a.shape))}" for k, a in zip(spec.inputs, args)]
        for fp16 in (False, True):
            key = name + ("" if batch == 1 else f"-b{batch}") + ("-fp16" if fp16 else "")
            t0 = time.perf_counter()
            r = api.build(f"zoo:{name}", t, out / "packages" / f"{key}.edgepkg", input_shapes=shapes, fp16=fp16)
            builds[key] = {"seconds": round(time.perf_counter() - t0, 1), "stages": r.manifest["build"]["seconds"],
                           "package_bytes": r.path.stat().st_size, "fatbin_bytes": r.manifest["backend"]["cuda"]["fatbin_bytes"]}
            print(f"  built {key}: {builds[key]['seconds']} s, {builds[key]['package_bytes'] / 1e6:.2f} MB "
                  f"(kernels {builds[key]['fatbin_bytes'] / 1e3:.0f} kB)", flush=True)
        stem = name + ("" if batch == 1 else f"-b{batch}")
        with torch.no_grad():
            torch.export.save(torch.export.export(spec.module.eval(), args), str(out / "torch" / f"{stem}.pt2"))
            torch.jit.save(torch.jit.trace(spec.module.eval(), args, strict=False), str(out / "torch" / f"{stem}.ts"))
print(f"  bundling the runtime for {t.arch} / CPython {py} (with TVM's CUDA runtime and libcudart)", flush=True)
bundle = bundle_runtime(t.arch, out / "runtime", py, cuda=True)
(out / "build.json").write_text(json.dumps({"target": t.to_dict(), "python": py, "builds": builds,
                                            "runtime_bytes": bundle["size_bytes"], "torch_exported_with": torch.__version__}, indent=2))
EOF
  cp "$0" "$tmp/gpu_check.sh"
  mv "$tmp" "$out"
  tar -czf "$out.tar.gz" -C "$(dirname "$out")" "$(basename "$out")"
  echo "gpu_check: wrote $out and $out.tar.gz; on the GPU machine: tar xzf $(basename "$out").tar.gz && cd $(basename "$out") && bash gpu_check.sh run"
  ;;

run)
  runs=500 python=python3.12
  while [[ $# -gt 0 ]]; do
    case "$1" in --runs) runs=$2; shift 2 ;; --python) python=$2; shift 2 ;; *) usage ;; esac
  done
  cd "$here"
  [[ -d runtime && -d packages ]] || { echo "gpu_check: run this inside the folder that 'gpu_check.sh build' wrote" >&2; exit 2; }
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader || true
  "$python" - "$runs" <<'EOF'
import json, os, subprocess, sys
from pathlib import Path

runs = int(sys.argv[1])
here = Path.cwd()
env = {**os.environ, "PYTHONPATH": str(here / "runtime")}

TORCH = r'''
import json, sys, time, zipfile, io
import numpy as np, torch
name, pkg, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
half = name.endswith("-fp16")
name = name.removesuffix("-fp16")
with zipfile.ZipFile(pkg) as z:
    ref = np.load(io.BytesIO(z.read("reference.npz")))
    manifest = json.loads(z.read("manifest.json"))
    inputs = [torch.from_numpy(np.ascontiguousarray(ref["input." + i["name"]])) for i in manifest["inputs"]]
    expected = [ref["output." + o["name"]] for o in manifest["outputs"]]
dev = torch.device("cuda")
try:
    module, how = torch.export.load(f"torch/{name}.pt2").module(), "torch.export"
except Exception as e:  # another torch version: TorchScript loads across versions
    module, how = torch.jit.load(f"torch/{name}.ts"), f"torchscript ({type(e).__name__})"
module = module.to(dev)
if half:  # the fp16 package against PyTorch in half precision too (integer inputs stay integers)
    module = module.half()
    inputs = [x.half() if x.is_floating_point() else x for x in inputs]
gpu_inputs = [x.to(dev) for x in inputs]
def once_on_gpu():
    with torch.no_grad():
        return module(*gpu_inputs)
def once_end_to_end():
    with torch.no_grad():
        out = module(*[x.to(dev) for x in inputs])
        return [o.cpu() for o in (out if isinstance(out, (tuple, list)) else [out])]
def p50(fn):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter(); fn(); torch.cuda.synchronize(); times.append(time.perf_counter() - t0)
    return float(np.percentile(np.array(times) * 1e3, 50))
out = once_end_to_end()
err = max(float(np.abs(o.float().numpy() - e).max()) / max(1.0, float(np.abs(e).max())) for o, e in zip(out, expected))
print(json.dumps({"how": how, "dtype": "float16" if half else "float32", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rel_max_abs_vs_reference": err,
                  "p50_ms_on_gpu": p50(once_on_gpu), "p50_ms_with_copies": p50(once_end_to_end)}))
'''

def run(args):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=1800)
    return proc.returncode, proc.stdout, proc.stderr.strip()

results, failed = {}, False
for pkg in sorted((here / "packages").glob("*.edgepkg")):
    name = pkg.stem
    r = results[name] = {}
    rc, out, err = run(["-m", "edgellm.runtime", "check", str(pkg), "--json"])
    if rc not in (0, 1):
        r["error"] = err.splitlines()[-1] if err else f"exit {rc}"
        failed = True
        print(f"{name}: FAILED to load: {r['error']}", flush=True)
        continue
    check = json.loads(out)
    r["check"] = {k: check.get(k) for k in ("passed", "rel_max_abs", "tolerance", "cosine_min", "min_cosine")}
    failed |= not check["passed"]
    rc, out, err = run(["-m", "edgellm.runtime", "profile", str(pkg), "--runs", str(runs), "--json", "--per-op"])
    if rc == 0:
        prof = json.loads(out)
        r["edgellm"] = {"p50_ms": prof["latency_ms"]["p50"], "p99_ms": prof["latency_ms"]["p99"], "load_ms": prof["load_ms"],
                        "first_inference_ms": prof["first_inference_ms"], "top_ops": (prof["per_op"] or [])[:5]}
    else:
        r["edgellm"] = {"error": err.splitlines()[-1] if err else f"exit {rc}"}
        failed = True
    rc, out, err = run(["-c", TORCH, name, str(pkg), str(runs)])
    r["torch"] = json.loads(out.strip().splitlines()[-1]) if rc == 0 else {"error": (err.splitlines() or ["?"])[-1]}
    e, t = r.get("edgellm", {}), r["torch"]
    print(f"{name:22s} accuracy {'PASS' if check['passed'] else 'FAIL'} ({check['rel_max_abs']:.2g}, cos {check['cosine_min']:.5f})   "
          f"edgellm p50 {e.get('p50_ms', float('nan')):.3f} ms   torch eager p50 {t.get('p50_ms_with_copies', float('nan')):.3f} ms "
          f"with copies, {t.get('p50_ms_on_gpu', float('nan')):.3f} ms on-GPU   "
          f"speedup {t.get('p50_ms_with_copies', float('nan')) / e.get('p50_ms', float('nan')):.2f}x", flush=True)
(here / "results.json").write_text(json.dumps(results, indent=2))
print(f"results: {here / 'results.json'}")
sys.exit(1 if failed else 0)
EOF
  ;;
*) usage ;;
esac
