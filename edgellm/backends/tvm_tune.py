"""MetaSchedule auto-tuning for edgellm's TVM CPU pipeline, with a database shared across builds.

``tune(mod, target, trials, db_dir)`` tunes the fused PrimFuncs that edgellm's schedule rules would
see (the Relax module after edgellm's pre-schedule passes + legalize + fuse: ``prepare``), and
``apply_database_pass(db_dir, target)`` is the pass that puts the tuned schedules in, inserted
before the hand-written rules (``pipeline(target, db_dir)`` is edgellm's CPU pipeline with it).

Per task (one fused PrimFunc, keyed by MetaSchedule's structural hash of the function + target):

1. already tuned in the database (``Database.has_workload`` + an edgellm entry or a record)?
   -> reused, no trials;
2. the hand-written rules' schedule is built and measured with the same builder/runner as the
   tuning trials, and committed to the database as a tuning record (its trace): the search is
   seeded with it (EvolutionarySearch starts from the database's best records), and since the
   database returns the fastest record, a tuned schedule is used only when it measured faster;
3. MetaSchedule (post-order-apply space, evolutionary search) runs this task's share of the trials.

The rules' measured time is also kept in ``edgellm_rules.json`` beside the database; the apply pass
leaves a function to the rules whenever the rules measured at least as fast as the best record
(the safety net for a rule schedule whose trace could not be stored).  So ``--tune`` can only help
(up to measurement noise).

Tuning needs xgboost (else the random cost model is used), psutil and cloudpickle.  The
LocalBuilder's default build function imports ``tvm.s_tir.tensor_intrin`` in every fresh worker
(30-43 s) and hits the build timeout; ``_build`` here does not.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

RULES_FILE = "edgellm_rules.json"
MIN_FLOP_SHARE = 0.01  # functions below this share of the model's FLOPs get no trials


def default_db_dir(target) -> Path:
    """~/.cache/edgellm/tuning/<target-hash>/ (EDGELLM_TUNING_DIR overrides the root)."""
    root = Path(os.environ.get("EDGELLM_TUNING_DIR") or Path.home() / ".cache" / "edgellm" / "tuning")
    return root / hashlib.sha256(str(target).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# the pipeline pieces


def prepare(mod, target):
    """The Relax module after the pre-schedule passes (legalized and fused, unscheduled)."""
    import tvm

    from edgellm.backends.tvm_cpu import pre_schedule_passes

    target = _target(target)
    with target:
        return tvm.transform.Sequential(pre_schedule_passes(target))(mod)


def pipeline(target, db_dir: str | Path | None = None):
    """edgellm's CPU pipeline with the tuning database applied before the hand-written rules."""
    from edgellm.backends.tvm_int8 import pipeline as edgellm_pipeline

    target = _target(target)
    db_dir = Path(db_dir) if db_dir is not None else default_db_dir(target)
    return edgellm_pipeline(target, before_rules=[apply_database_pass(db_dir, target)])


def _target(target):
    import tvm

    return target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)


def _tuning_target(target):
    """MetaSchedule wants num-cores on a CPU target."""
    import tvm

    target = _target(target)
    config = dict(target.export())
    if target.kind.name == "llvm" and not config.get("num-cores"):
        from tvm.s_tir.meta_schedule.utils import cpu_count

        config["num-cores"] = cpu_count(logical=False)
        try:
            return tvm.target.Target(config)
        except Exception:  # noqa: BLE001
            return tvm.target.Target(str(target) + f" -num-cores={config['num-cores']}")
    return target


# ---------------------------------------------------------------------------------------------
# database


def _open_db(db_dir):
    from tvm.s_tir import meta_schedule as ms

    db_dir = Path(db_dir)
    db_dir.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(path_workload=str(db_dir / "database_workload.json"),
                                    path_tuning_record=str(db_dir / "database_tuning_record.json"),
                                    module_equality="structural")


def _key(mod, target) -> str:
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(mod):x}:{hashlib.sha256(str(target).encode()).hexdigest()[:12]}"


def _load_rules(db_dir) -> dict:
    path = Path(db_dir) / RULES_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save_rules(db_dir, entries: dict) -> None:
    path = Path(db_dir) / RULES_FILE
    merged = {**_load_rules(db_dir), **entries}  # other builds may have written meanwhile
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
    tmp.replace(path)


def _mean(run_secs) -> float:
    values = [float(s) for s in run_secs]
    return sum(values) / len(values) if values else float("inf")


def _record_seconds(record) -> float:
    return _mean(record.run_secs) if record is not None and record.run_secs else float("inf")


def choose(rule_seconds: float | None, tuned_seconds: float | None) -> str:
    """'tuned' only when the tuned schedule measured strictly faster than the rules' schedule."""
    if tuned_seconds is None or math.isnan(tuned_seconds) or math.isinf(tuned_seconds):
        return "rules"
    if rule_seconds is None or rule_seconds == float("inf"):
        return "tuned"
    return "tuned" if tuned_seconds < rule_seconds else "rules"


def apply_database_pass(db_dir, target):
    """MetaScheduleApplyDatabase over the database in ``db_dir``, restricted to the records that beat
    the hand-written rules' measured time; functions with no (winning) record are left untouched
    (for edgellm's rules, which run next)."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    target = _target(target)
    db_dir = Path(db_dir)

    @tvm.transform.module_pass(opt_level=0, name="EdgeApplyTuningDatabase")
    def _apply(mod, _ctx):
        if not (db_dir / "database_workload.json").exists():
            return mod
        db = _open_db(db_dir)
        rules = _load_rules(db_dir)
        winners = ms.database.MemoryDatabase(module_equality="structural")
        tasks = ms.relax_integration.extract_tasks(mod, _tuning_target(target))
        for task in tasks:
            task_mod = task.dispatched[0]
            if not db.has_workload(task_mod):
                continue
            record = db.query_tuning_record(task_mod, task.target, "main")
            entry = rules.get(_key(task_mod, target))
            if record is None:
                continue
            if entry is not None and entry.get("rule_hash") != rules_fingerprint(task_mod["main"], target):
                continue  # measured against another version of the rules: keep the rules until retuned
            if choose(entry.get("rule_s") if entry else None, _record_seconds(record)) != "tuned":
                continue
            workload = winners.commit_workload(task_mod)
            winners.commit_tuning_record(ms.database.TuningRecord(
                record.trace, workload, record.run_secs, record.target, record.args_info))
        if not len(winners):
            return mod
        with target, winners:
            return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)

    return _apply


# ---------------------------------------------------------------------------------------------
# builder / runner


@contextlib.contextmanager
def _cpu_intrinsics():
    """``TuneContext`` imports ``tvm.s_tir.tensor_intrin`` (30-70 s here, mostly the CUDA intrinsics
    parsed from TVMScript).  A CPU tuning needs only the x86 / arm ones (the VNNI rule looks up
    ``dot_16x4_vnni``): load those under a stub package for the duration, then drop the stub (the
    loaded submodules stay, so a later real import does not register them twice)."""
    import importlib
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    import tvm.s_tir

    stub = types.ModuleType(name)
    stub.__path__ = [str(Path(tvm.s_tir.__file__).parent / "tensor_intrin")]
    sys.modules[name] = stub
    try:
        for sub in ("x86", "arm_cpu"):
            with contextlib.suppress(Exception):
                importlib.import_module(f"{name}.{sub}")
        yield
    finally:
        if sys.modules.get(name) is stub:
            del sys.modules[name]


def _build(mod, target, _params):
    """LocalBuilder build function: the default one minus ``import tvm.s_tir.tensor_intrin``."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def _export_shared(mod, cxx: str | None = None) -> str:
    """LocalBuilder export for a remote device: a linked .so (the default, a .tar of objects, needs a compiler on the
    device to link), cross-linked with ``cxx`` for another architecture."""
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="edgellm-tune-"), "tvm_tmp_mod.so")
    mod.export_library(path, **({"cc": cxx} if cxx else {}))
    return path


def make_builder(target=None, remote: str | None = None):
    import functools

    from tvm.s_tir import meta_schedule as ms

    if not remote:
        return ms.builder.LocalBuilder(f_build=_build, timeout_sec=120)
    from edgellm.backends.tvm_base import CROSS_CXX

    arch = str(target.attrs.get("mtriple", "")).split("-")[0] if target is not None else ""
    cxx = CROSS_CXX.get(arch) if arch and arch != platform.machine() else None
    return ms.builder.LocalBuilder(f_build=_build, f_export=functools.partial(_export_shared, cxx=cxx), timeout_sec=120)


def make_runner(remote: str | None = None):
    """Candidates timed here (LocalRunner), or on the fleet's devices of a key through the tracker (RPCRunner: one
    worker per device of the key, so every free device measures in parallel)."""
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=3, min_repeat_ms=50)
    if not remote:
        return ms.runner.LocalRunner(evaluator_config=evaluator, timeout_sec=60)
    from edgellm.fleet.remote import Remote, key_pool

    where = Remote.parse(remote)
    pool = key_pool(where)
    config = ms.runner.RPCConfig(tracker_host=where.host, tracker_port=where.port, tracker_key=where.key,
                                 session_priority=1, session_timeout_sec=300)
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=pool["total"])


def _rule_schedule(func, target):
    """The hand-written rules' schedule of a PrimFunc (first rule whose schedule lowers), or None."""
    from edgellm.backends.tvm_cpu.apply import _lowers
    from edgellm.backends.tvm_int8 import schedule_rules

    for rule in schedule_rules():
        try:
            with target:
                sch = rule.apply(func, target, False)
        except Exception:  # noqa: BLE001
            sch = None
        if sch is None:
            continue
        if isinstance(sch, (list, tuple)):
            sch = sch[0]
        if _lowers(sch.mod["main"], target):
            return type(rule).__name__, sch
    return None, None


def rules_fingerprint(func, target, sch=None) -> str | None:
    """Which hand-written schedule a stored rule time belongs to: the structural hash of the rules'
    schedule of ``func``.  The rules change between edgellm versions; a rule time
    measured for an older schedule says nothing about the current one."""
    import tvm_ffi

    if sch is None:
        _, sch = _rule_schedule(func, target)
    if sch is None:
        return None
    return f"{tvm_ffi.structural_hash(sch.mod['main']):x}"


def _measure(mods, target, builder, runner) -> list[float | None]:
    """Mean run seconds of each single-PrimFunc module, measured like a tuning trial."""
    from tvm.s_tir import meta_schedule as ms

    built = builder.build([ms.builder.BuilderInput(m, target) for m in mods])
    out: list[float | None] = [None] * len(mods)
    inputs, where = [], []
    for i, (m, b) in enumerate(zip(mods, built)):
        if b.error_msg is None:
            inputs.append(ms.runner.RunnerInput(b.artifact_path, "cpu", ms.arg_info.ArgInfo.from_prim_func(m["main"])))
            where.append(i)
    for i, future in zip(where, runner.run(inputs)):
        result = future.result()
        if result.error_msg is None and result.run_secs:
            out[i] = _mean(result.run_secs)
    for b in built:
        if b.artifact_path:
            try:
                Path(b.artifact_path).unlink()
                Path(b.artifact_path).parent.rmdir()
            except OSError:
                pass
    return out


def _commit_rule_record(db, task_mod, sch, seconds, target) -> bool:
    """Store the rules' schedule as a tuning record (when its trace replays to the same function)."""
    import tvm
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    try:
        trace = sch.trace
        replay = tvm.s_tir.Schedule(task_mod)
        trace.apply_to_schedule(replay, remove_postproc=False)
        if not tvm_ffi.structural_equal(replay.mod["main"].without_attr("tirx.is_scheduled")
                                       if "tirx.is_scheduled" in replay.mod["main"].attrs else replay.mod["main"],
                                       sch.mod["main"]):
            return False
        workload = db.commit_workload(task_mod)
        db.commit_tuning_record(ms.database.TuningRecord(
            trace, workload, [seconds], target, ms.arg_info.ArgInfo.from_prim_func(task_mod["main"])))
        return True
    except Exception:  # noqa: BLE001
        return False


def _flops(mod) -> float:
    try:
        from tvm.s_tir.analysis import estimate_tir_flops
    except ImportError:
        try:
            from tvm.tirx.analysis import estimate_tir_flops
        except ImportError:
            return 1.0
    try:
        return max(float(estimate_tir_flops(mod)), 1.0)
    except Exception:  # noqa: BLE001
        return 1.0


def split_trials(weights: list[float], trials: int, minimum: int = 4) -> list[int]:
    """Trials per task, proportional to weight (largest first), each at least ``minimum`` while the
    budget lasts; weight 0 gets none; the total never exceeds ``trials``."""
    order = sorted((i for i in range(len(weights)) if weights[i] > 0), key=lambda i: -weights[i])
    share = [0] * len(weights)
    left = trials
    total = sum(weights) or 1.0
    for i in order:
        want = max(minimum, round(trials * weights[i] / total))
        share[i] = min(want, left)
        left -= share[i]
    i = 0
    while left > 0 and order:  # rounding leftovers to the heaviest tasks
        share[order[i % len(order)]] += 1
        left -= 1
        i += 1
    return share


# ---------------------------------------------------------------------------------------------
# tuning


def tune(mod, target, trials: int, db_dir: str | Path, budget_s: float | None = None,
         progress: Callable[[str], None] | None = None, *, prepared: bool = False, seed: int | None = None,
         remote: str | None = None) -> dict:
    """Tune the fused PrimFuncs of ``mod`` (a Relax module as imported, or with ``prepared=True`` one
    already through ``prepare``) into the JSON database in ``db_dir``.

    Returns {"tasks", "tuned", "reused", "skipped", "trials", "seconds", "db_dir", "functions": [...]}
    where each function has name, rule_ms, best_ms, trials, status (reused / tuned / budget / ...).
    """
    from tvm.s_tir import meta_schedule as ms

    start = time.monotonic()
    say = progress or (lambda _line: None)
    target = _target(target)
    tune_target = _tuning_target(target)
    db_dir = Path(db_dir)
    db = _open_db(db_dir)
    if not prepared:
        mod = prepare(mod, target)
    tasks = [t for t in ms.relax_integration.extract_tasks(mod, tune_target)
             if not t.mod.attrs.get("tirx.is_scheduled", False)]
    rules = _load_rules(db_dir)
    report = {"tasks": len(tasks), "tuned": 0, "reused": 0, "skipped": 0, "trials": 0, "seconds": 0.0,
              "db_dir": str(db_dir), "functions": []}

    todo = []
    for task in tasks:
        task_mod = task.dispatched[0]
        key = _key(task_mod, target)
        entry = rules.get(key)
        if entry and entry.get("rule_hash") != rules_fingerprint(task_mod["main"], target):
            # the rules changed since this was tuned: measure them again, tune on (the records stay)
            entry = {"trials": entry.get("trials")}
        record = db.query_tuning_record(task_mod, tune_target, "main") if db.has_workload(task_mod) else None
        if (entry and entry.get("tuned")) or (not entry and record is not None):
            report["reused"] += 1
            report["functions"].append({"name": task.task_name, "status": "reused", "trials": 0,
                                        "rule_ms": _ms(entry.get("rule_s") if entry else None),
                                        "best_ms": _ms(_record_seconds(record))})
            continue
        todo.append((task, key, entry or {}))
    if report["reused"]:
        say(f"{report['reused']}/{len(tasks)} tasks already tuned in {db_dir}")

    # remote: candidates are timed on the fleet's devices of a key (HOST:PORT/KEY), the database stays here
    builder, runner = (make_builder(tune_target, remote), make_runner(remote)) if todo and trials > 0 else (None, None)
    # trials in proportion to FLOPs; a function under MIN_FLOP_SHARE of the model's FLOPs (reused ones
    # included) is not worth a trial: it stays with the rules, and a rebuild does not spend on it
    flops = {t.task_name: _flops(t.dispatched[0]) for t in tasks}
    small = MIN_FLOP_SHARE * sum(flops.values())
    weights = [flops[t.task_name] if flops[t.task_name] >= small else 0.0 for t, _k, _e in todo]
    shares = split_trials(weights, trials) if todo else []
    new_entries = {}
    for n, ((task, key, entry), share) in enumerate(zip(todo, shares), 1):
        task_mod = task.dispatched[0]
        fn = {"name": task.task_name, "trials": 0, "rule_ms": None, "best_ms": None}
        report["functions"].append(fn)
        if budget_s is not None and time.monotonic() - start >= budget_s:
            fn["status"] = "budget"
        elif weights[n - 1] == 0.0:
            fn["status"] = "too small to tune"
        elif share <= 0:
            fn["status"] = "no trials left"
        if "status" in fn:
            report["skipped"] += 1
            say(f"task {n}/{len(todo)} {task.task_name}: skipped ({fn['status']}), left to the rules")
            continue
        # 1. the hand-written rules' schedule, measured like a trial and stored as a seed record
        rule_s = entry.get("rule_s")
        rule_name, sch = _rule_schedule(task_mod["main"], target)
        if rule_s is None and sch is not None:
            rule_s = _measure([sch.mod], tune_target, builder, runner)[0]
            if rule_s is not None:
                _commit_rule_record(db, task_mod, sch, rule_s, tune_target)
        fn["rule_ms"], fn["rule"] = _ms(rule_s), rule_name
        # 2. MetaSchedule
        cost_model = "xgb" if importlib.util.find_spec("xgboost") is not None else "random"
        workdir = db_dir / "logs"
        with _cpu_intrinsics():
            ctx = ms.TuneContext(mod=task_mod, target=tune_target, space_generator="post-order-apply",
                                 search_strategy="evolutionary", task_name=task.task_name,
                                 logger=_task_logger(workdir, task.task_name),
                                 rand_state=ms.utils.fork_seed(seed, n=1)[0], num_threads="physical").clone()
        error = None
        try:
            ms.tune_tasks(tasks=[ctx], task_weights=[1.0], work_dir=str(workdir), max_trials_global=share,
                          max_trials_per_task=share, num_trials_per_iter=min(share, 64), builder=builder,
                          runner=runner, database=db, cost_model=cost_model, measure_callbacks="default",
                          task_scheduler="round-robin")
        except Exception as e:  # noqa: BLE001
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}"
        record = db.query_tuning_record(task_mod, tune_target, "main")
        best_s = _record_seconds(record)
        fn.update(trials=share, best_ms=_ms(best_s), status="tuned" if error is None else f"failed ({error})",
                  uses=choose(rule_s, best_s))
        report["trials"] += share
        report["tuned"] += error is None
        new_entries[key] = {"task": task.task_name, "rule_s": rule_s, "rule": rule_name,
                            "rule_hash": rules_fingerprint(task_mod["main"], target, sch) if sch is not None else None,
                            "tuned": error is None, "trials": share + (entry.get("trials") or 0)}
        _save_rules(db_dir, new_entries)
        say(f"task {n}/{len(todo)} {task.task_name}: {share} trials, best {_fmt(best_s)}"
            f" (rules {_fmt(rule_s)}, using {fn['uses']})" + (f" [{error}]" if error else ""))
    report["seconds"] = round(time.monotonic() - start, 1)
    return report


def _task_logger(workdir: Path, name: str):
    """A file-only logger for one task (MetaSchedule's own setup also logs to stdout)."""
    import logging

    logger = logging.getLogger(f"edgellm.tvm_tune.{name}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    path = str(workdir / f"{name[:100]}.log")
    if not any(getattr(h, "baseFilename", None) == os.path.abspath(path) for h in logger.handlers):
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()
        workdir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, mode="a")
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s"))
        logger.addHandler(handler)
    return logger


def _ms(seconds):
    """Milliseconds, unrounded: the report is data (rounding made a tuned-vs-rules tie out of a win)."""
    return None if seconds is None or seconds == float("inf") else seconds * 1e3


def _fmt(seconds) -> str:
    return "n/a" if seconds is None or seconds == float("inf") else f"{seconds * 1e3:.3g} ms"
