"""One loaded model called from many threads at once returns exactly what one thread gets, on every backend."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from edgellm import runtime


def _inputs(model, n: int) -> list[dict]:
    rng = np.random.default_rng(1)
    return [{s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in model.inputs} for _ in range(n)]


def _hammer(model, inputs: list[dict], threads: int, calls: int) -> list[tuple[int, int]]:
    """(thread, call) pairs whose outputs differ from the single-thread result of the same input."""
    expected = [model.run(**x) for x in inputs]
    wrong: list[tuple[int, int]] = []
    start = threading.Barrier(threads)

    def caller(t: int) -> None:
        start.wait()
        for i in range(calls):
            k = (t * 7 + i) % len(inputs)
            got = model.run(**inputs[k])
            if any(not np.array_equal(got[name], expected[k][name]) for name in expected[k]):
                wrong.append((t, i))

    pool = [threading.Thread(target=caller, args=(t,)) for t in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return wrong


@pytest.mark.parametrize("backend", ["tvm", "openvino"])
@pytest.mark.parametrize("threads", [4, 16])
def test_threads_hammering_one_model_get_single_thread_results(packages, backend, threads):
    """Before sessions, 4 threads on one TVM package segfaulted in StorageObj::AllocTensor and OpenVINO raised
    'Infer Request is busy'. ``concurrency=4`` lets 4 calls run side by side even on a 2-core machine."""
    model = runtime.load(packages("kws-cnn", "x86_64", backend), threads=1, concurrency=4)
    assert _hammer(model, _inputs(model, 8), threads, calls=40) == []


def test_tvm_sessions_are_made_per_concurrent_caller_and_reused(packages):
    model = runtime.load(packages("kws-cnn", "x86_64", "tvm"), threads=1, concurrency=3)
    assert _hammer(model, _inputs(model, 4), 8, calls=30) == []
    assert 1 <= model._engine.sessions <= 3  # never more sessions than calls allowed at once
    for _ in range(50):
        model.run(**_inputs(model, 1)[0])
    assert model._engine.sessions <= 3


def test_default_concurrency_fills_the_cores_without_oversubscribing(kws_pkg):
    from edgellm.runtime import device

    model = runtime.load(kws_pkg, threads=1)
    assert model.concurrency == device.cpu_count()
    assert runtime.load(kws_pkg, threads=device.cpu_count()).concurrency == 1


@pytest.mark.slow
def test_soak_rss_stops_growing(kws_pkg):
    """100,000 inferences from 4 threads in a fresh process: RSS after them within 5% of RSS after the first 1,000."""
    script = textwrap.dedent(f"""
        import threading, numpy as np, psutil
        import edgellm.runtime as rt
        m = rt.load({str(kws_pkg)!r}, threads=1, concurrency=2)
        x = m.example_inputs()
        def calls(n):
            def work():
                for _ in range(n // 4):
                    m.run(**x)
            pool = [threading.Thread(target=work) for _ in range(4)]
            [t.start() for t in pool]; [t.join() for t in pool]
        calls(1000)
        after_1k = psutil.Process().memory_info().rss
        calls(99000)
        after_100k = psutil.Process().memory_info().rss
        print(after_1k, after_100k)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    after_1k, after_100k = map(int, out.stdout.split())
    print(f"RSS after 1k calls {after_1k / 2**20:.1f} MB, after 100k {after_100k / 2**20:.1f} MB")
    assert after_100k <= 1.05 * after_1k
