"""edgellm.backends.tvm_tune: MetaSchedule tuning into a shared database, applied before the rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
torch = pytest.importorskip("torch")
pytest.importorskip("cloudpickle")
pytest.importorskip("psutil")

from edgellm.backends import tvm_tune

TARGET = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v4", "mattr": ["+avx512vnni"]}


def _host_target():
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("the tests tune for x86-64")
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if "avx512f" not in flags:
        return tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"})
    return tvm.target.Target(TARGET)


class MatmulBiasRelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(128, 64)

    def forward(self, x):
        return torch.relu(self.fc(x))


class TwoLayer(torch.nn.Module):
    """Contains the same 32x128 @ 128x64 + bias + relu function as MatmulBiasRelu (other weights)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(128, 64)
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.head(torch.relu(self.fc(x)))


def _relax(model, x):
    from tvm.relax.frontend.torch import from_exported_program

    return from_exported_program(torch.export.export(model.eval(), (x,)))


def _run(mod, target, pipeline, x):
    ex = tvm.compile(mod, target, relax_pipeline=pipeline)
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy()))
    return (out if hasattr(out, "numpy") else out[0]).numpy()


# ------------------------------------------------------------------------------------------ fast


def test_choose_keeps_the_faster():
    assert tvm_tune.choose(2e-3, 1e-3) == "tuned"
    assert tvm_tune.choose(1e-3, 2e-3) == "rules"
    assert tvm_tune.choose(1e-3, 1e-3) == "rules"  # a tie keeps the hand-written schedule
    assert tvm_tune.choose(1e-3, None) == "rules"
    assert tvm_tune.choose(1e-3, float("inf")) == "rules"  # every trial failed
    assert tvm_tune.choose(None, 1e-3) == "tuned"  # no rule schedule: anything measured beats scalar code


def test_split_trials_stays_within_budget():
    assert sum(tvm_tune.split_trials([100.0, 1.0, 1.0], 64)) == 64
    shares = tvm_tune.split_trials([100.0, 10.0, 1.0], 16)
    assert sum(shares) <= 16 and shares[0] == max(shares)
    assert tvm_tune.split_trials([1.0] * 10, 8) == [4, 4] + [0] * 8
    assert tvm_tune.split_trials([0.0, 5.0, 0.0], 8) == [0, 8, 0]  # too small to tune: no trials


def _fake_db(tmp_path, mod, target, record_s, rule_s, rule_hash=None):
    """A database holding one record (a no-op trace) for the model's only function, measured
    ``record_s``; the rules measured ``rule_s``."""
    from tvm.s_tir import meta_schedule as ms

    prepared = tvm_tune.prepare(mod, target)
    tasks = ms.relax_integration.extract_tasks(prepared, tvm_tune._tuning_target(target))
    assert len(tasks) == 1
    task_mod = tasks[0].dispatched[0]
    db = tvm_tune._open_db(tmp_path)
    workload = db.commit_workload(task_mod)
    sch = tvm.s_tir.Schedule(task_mod)
    sch.get_loops(sch.get_sblock("matmul"))  # the database ignores records with an empty trace
    db.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, workload, [record_s], tvm_tune._tuning_target(target),
        ms.arg_info.ArgInfo.from_prim_func(task_mod["main"])))
    fingerprint = tvm_tune.rules_fingerprint(task_mod["main"], target) if rule_hash is None else rule_hash
    (tmp_path / tvm_tune.RULES_FILE).write_text(json.dumps(
        {tvm_tune._key(task_mod, target): {"rule_s": rule_s, "tuned": True, "task": tasks[0].task_name,
                                           "rule_hash": fingerprint}}))
    return prepared


def _scheduled(mod):
    return {gv.name_hint: bool(f.attrs and f.attrs.get("tirx.is_scheduled", False))
            for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


@pytest.mark.parametrize("record_s, rule_s, applied", [(1e-3, 2e-3, True), (2e-3, 1e-3, False), (1e-3, 1e-3, False)])
def test_apply_pass_uses_a_record_only_when_it_beat_the_rules(tmp_path, record_s, rule_s, applied):
    target = _host_target()
    prepared = _fake_db(tmp_path, _relax(MatmulBiasRelu(), torch.randn(32, 128)), target, record_s, rule_s)
    with target:
        out = tvm_tune.apply_database_pass(tmp_path, target)(prepared)
    assert list(_scheduled(out).values()) == [applied]


def test_apply_pass_ignores_a_rule_time_measured_for_other_rules(tmp_path):
    """A rule time stored for another version of the rules (another schedule) is stale: the record
    is not applied even though it beat that time; the current rules schedule the function."""
    target = _host_target()
    prepared = _fake_db(tmp_path, _relax(MatmulBiasRelu(), torch.randn(32, 128)), target, 1e-3, 2e-3,
                        rule_hash="0")
    with target:
        out = tvm_tune.apply_database_pass(tmp_path, target)(prepared)
    assert list(_scheduled(out).values()) == [False]


def test_rules_fingerprint_is_stable():
    from tvm.s_tir import meta_schedule as ms

    target = _host_target()
    prepared = tvm_tune.prepare(_relax(MatmulBiasRelu(), torch.randn(32, 128)), target)
    (task,) = ms.relax_integration.extract_tasks(prepared, tvm_tune._tuning_target(target))
    a = tvm_tune.rules_fingerprint(task.dispatched[0]["main"], target)
    b = tvm_tune.rules_fingerprint(task.dispatched[0]["main"], target)
    assert a is not None and a == b


def test_apply_pass_without_a_database_changes_nothing(tmp_path):
    target = _host_target()
    prepared = tvm_tune.prepare(_relax(MatmulBiasRelu(), torch.randn(32, 128)), target)
    with target:
        out = tvm_tune.apply_database_pass(tmp_path / "none", target)(prepared)
    assert list(_scheduled(out).values()) == [False]


# ------------------------------------------------------------------------------------------ slow


@pytest.mark.slow
def test_tune_apply_and_reuse(tmp_path):
    target = _host_target()
    torch.manual_seed(0)
    x = torch.randn(32, 128)
    model = MatmulBiasRelu().eval()
    mod = _relax(model, x)
    lines = []

    report = tvm_tune.tune(mod, target, 8, tmp_path, progress=lines.append)
    assert report["tasks"] == 1 and report["tuned"] == 1 and report["reused"] == 0
    assert 0 < report["trials"] <= 8
    records = (tmp_path / "database_tuning_record.json").read_text().splitlines()
    assert len(records) >= 2  # the rules' schedule (seed) + measured trials
    assert lines and lines[-1].startswith("task 1/1 fused_matmul_add_relu: 8 trials, best ")
    (fn,) = report["functions"]
    # never worse than the hand-written rules: their schedule is in the database as a measured
    # record, so the best record is at most the rules' time, and a record is applied only if faster
    assert fn["rule_ms"] is not None and fn["best_ms"] is not None
    assert fn["best_ms"] <= fn["rule_ms"]
    assert fn["uses"] == tvm_tune.choose(fn["rule_ms"], fn["best_ms"])

    expected = model(x).detach().numpy()
    got = _run(mod, target, tvm_tune.pipeline(target, tmp_path), x)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()

    again = tvm_tune.tune(mod, target, 8, tmp_path)
    assert again["reused"] == 1 and again["trials"] == 0 and again["tuned"] == 0

    # another model with the same matmul shape (different weights): that function is reused;
    # with no time budget left nothing else is started
    model2 = TwoLayer().eval()
    mod2 = _relax(model2, x)
    other = tvm_tune.tune(mod2, target, 8, tmp_path, budget_s=0)
    assert other["tasks"] == 2 and other["reused"] == 1 and other["trials"] == 0 and other["skipped"] == 1
    expected2 = model2(x).detach().numpy()
    got2 = _run(mod2, target, tvm_tune.pipeline(target, tmp_path), x)
    assert np.abs(got2 - expected2).max() <= 1e-4 * np.abs(expected2).max()
