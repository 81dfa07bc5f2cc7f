"""The runtime's default thread count: measured at build time on the build machine (or on the device by
``python -m edgellm.runtime threads``), used only on the CPU it was measured on; the physical cores elsewhere."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

import edgellm.runtime as rt
from edgellm.runtime import device, threads
from edgellm.runtime.package import read_manifest
from tests.conftest import ROOT, import_blocker


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test its own per-user cache: no record saved by a user or another test is seen."""
    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_physical_cores_are_between_one_and_the_cpus_this_process_may_use():
    assert 1 <= device.physical_cores() <= device.cpu_count()


def test_smt_siblings_count_once_and_a_cgroup_quota_caps_cores(tmp_path):
    """A sysfs tree where every allowed CPU is a hyperthread of CPU 0's core: one physical core."""
    allowed = sorted(device.os.sched_getaffinity(0))
    siblings = ",".join(map(str, allowed))
    for cpu in allowed:
        (tmp_path / f"cpu{cpu}" / "topology").mkdir(parents=True)
        (tmp_path / f"cpu{cpu}" / "topology" / "thread_siblings_list").write_text(siblings + "\n")
    assert device.physical_cores(tmp_path) == 1
    assert device.physical_cores(tmp_path / "none") == min(device.cpu_count(), device._quota_cores() or device.cpu_count())
    assert device._cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert device._quota_cores(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert device._quota_cores(tmp_path) is None


def test_counts_are_powers_of_two_and_the_cores():
    assert threads.counts(1) == [1]
    assert threads.counts(2) == [1, 2]
    assert threads.counts(6) == [1, 2, 4, 6]
    assert threads.counts(8) == [1, 2, 4, 8]


def test_a_host_build_records_the_table_and_the_best(kws_pkg):
    rec = read_manifest(kws_pkg)["threads"]
    assert rec["cpu"] == device.cpu_model() and rec["cores"] == device.physical_cores()
    assert list(rec["p50_ms"]) == [str(k) for k in threads.counts()]
    assert all(v > 0 for v in rec["p50_ms"].values())
    fastest = min(rec["p50_ms"].values())
    assert rec["p50_ms"][str(rec["best"])] <= fastest * (1 + threads.WITHIN)
    assert all(v > fastest * (1 + threads.WITHIN) for k, v in rec["p50_ms"].items() if int(k) < rec["best"])  # the fewest


def test_load_uses_the_recorded_best_on_this_cpu_and_given_threads_win(kws_pkg):
    best = read_manifest(kws_pkg)["threads"]["best"]
    model = rt.load(kws_pkg)
    assert (model.threads, model.threads_from) == (best, "measured on this CPU at build time")
    given = rt.load(kws_pkg, threads=1)  # (more than the cores: TVM would pin the calling thread to one core)
    assert (given.threads, given.threads_from) == (1, "given")
    assert given._engine.threads == 1


def test_a_record_from_another_cpu_or_core_count_is_not_used(kws_pkg):
    manifest = read_manifest(kws_pkg)
    other = copy.deepcopy(manifest)
    other["threads"]["best"] = best = device.physical_cores() + 5  # a count the static default never gives
    assert threads.choose(other) == (best, "measured on this CPU at build time")
    other["threads"]["cpu"] = "Some Other CPU 9000"
    assert threads.choose(other) == (device.physical_cores(), "physical cores")
    other["threads"].update(cpu=device.cpu_model(), cores=device.physical_cores() + 1)
    assert threads.choose(other) == (device.physical_cores(), "physical cores")
    other["threads"] = {"best": "four"}  # malformed: ignored, never a crash at load
    assert threads.choose(other) == (device.physical_cores(), "physical cores")
    assert threads.choose(other, 2) == (2, "given")


def test_a_saved_measurement_for_this_cpu_is_preferred_and_others_are_ignored(kws_pkg, own_cache):
    manifest = read_manifest(kws_pkg)
    rec = copy.deepcopy(manifest["threads"])
    rec["best"] = 1 if manifest["threads"]["best"] != 1 else device.physical_cores()  # another count, where there is one
    threads.save(manifest, {**rec, "cpu": "Some Other CPU 9000"})
    assert rt.load(kws_pkg).threads == manifest["threads"]["best"]
    path = threads.save(manifest, rec)
    assert path.parent == own_cache
    model = rt.load(kws_pkg)
    assert model.threads == rec["best"] and str(path) in model.threads_from
    assert rt.load(kws_pkg, threads=1).threads == 1
    path.write_text("{not json")  # a corrupt cache is as if empty
    assert rt.load(kws_pkg).threads == manifest["threads"]["best"]


@pytest.mark.skipif(device.cpu_count() < 2, reason="needs two cores")
def test_models_with_different_threads_called_from_one_thread_each_get_their_own_pool_size(kws_pkg):
    """TVM's pool belongs to the calling thread: the measurement alternates engines at 1 and N threads from one thread."""
    import tvm

    pool_size = tvm.get_global_func("runtime.NumThreads")
    one, two = rt.load(kws_pkg, threads=1), rt.load(kws_pkg, threads=2)
    x = one.example_inputs()
    sizes = []
    for model in (one, two, one, two):
        model(**x)
        sizes.append(pool_size())
    assert sizes == [1, 2, 1, 2]


RUN = import_blocker("torch", "onnx", "onnxruntime", "click", "rich", "tvm.relax", "tvm.s_tir", "tvm.script.parser", "edgellm.api",
                     "edgellm.backends", "edgellm.cli", "edgellm.compress") + """
from edgellm.runtime.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def _device_command(*args, cache):
    """``python -m edgellm.runtime`` as on a device: the compiler side cannot be imported."""
    return subprocess.run([sys.executable, "-c", RUN, *args], check=False, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "EDGELLM_CACHE": str(cache)})


def test_device_command_prints_the_table_and_json_and_saves_for_later_loads(kws_pkg, own_cache):
    proc = _device_command("threads", str(kws_pkg), cache=own_cache)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == threads.counts()
    assert sum("<- best" in line for line in proc.stdout.splitlines()) == 1
    assert not own_cache.exists()  # printed only, unless --save

    proc = _device_command("threads", str(kws_pkg), "--json", "--save", cache=own_cache)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    rec = report["record"]
    assert list(rec["p50_ms"]) == [str(k) for k in threads.counts()] and rec["best"] in threads.counts()
    assert report["saved"] == str(own_cache / "threads.json")
    assert report["load"]["threads"] == rec["best"]
    assert threads.saved(read_manifest(kws_pkg)) == rec
    assert rt.load(kws_pkg).threads_from.startswith("measured on this CPU (")


def test_device_command_on_a_missing_package_is_one_error_line(tmp_path, own_cache):
    proc = _device_command("threads", str(tmp_path / "nope.edgepkg"), cache=own_cache)
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
