"""Calibration and evaluation samples: what int8 calibrates on and what accuracy is measured on.

A spec is one of:

- a folder of ``.npy`` / ``.npz`` files, one sample per file, taken in name order (``.npy`` only for a
  model with a single input; ``.npz`` keyed by input name);
- one ``.npz`` holding many samples: per input, an array with a leading sample axis over the model's
  shape (``[N, *shape]``; for a batch-1 input ``[N, *shape[1:]]`` is accepted too). One ``.npy`` works
  the same way for a single-input model;
- ``"random"``: seeded samples like ``edgellm.trace.sample``. A warning is logged: calibration on noise
  gives poor int8 scales, and accuracy figures measured on noise say nothing about real inputs.

Every sample is checked against the model's inputs (names, shapes, dtypes); a mismatch is one EdgeError
line naming the file and the problem. Arrays of the same kind but another width (float64 for float32,
int32 for int64) are converted; other dtypes are refused.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from edgellm.errors import EdgeError
from edgellm.runtime.model import TensorSpec

log = logging.getLogger("edgellm.compress")

RANDOM = "random"
RANDOM_COUNT = 32  # samples made for "random"
RANDOM_WARNING = ("calibration/evaluation on random inputs: int8 scales fitted to noise, and the accuracy figures "
                  "say nothing about real data (give --calib/--eval a folder or .npz of real inputs)")

Sample = dict[str, np.ndarray]


def random_samples(inputs: list[TensorSpec], count: int = RANDOM_COUNT, seed: int = 1000) -> list[Sample]:
    """``count`` deterministic samples, each input drawn like ``trace.sample`` (its own seed per sample and input)."""
    from edgellm.trace import sample

    return [{s.name: sample(tuple(s.shape), s.dtype, seed=seed + i * len(inputs) + k) for k, s in enumerate(inputs)}
            for i in range(count)]


def load_samples(spec: str | Path, inputs: list[TensorSpec], *, random_count: int = RANDOM_COUNT,
                 random_seed: int = 1000) -> list[Sample]:
    """Samples as feed dicts ``{input name: array}`` in the model's input order (see the module docstring)."""
    if not inputs:
        raise EdgeError("the model has no inputs to calibrate")
    if str(spec) == RANDOM:
        log.warning(RANDOM_WARNING)
        return random_samples(inputs, random_count, random_seed)
    path = Path(spec)
    if not path.exists():
        raise EdgeError(f"calibration data {spec} does not exist", "give a folder of .npy/.npz files, one .npz, or 'random'")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".npy", ".npz"))
        if not files:
            raise EdgeError(f"folder {path} has no .npy or .npz files", "save one sample per file with np.save / np.savez")
        return [_one_sample(f, inputs) for f in files]
    if path.suffix in (".npz", ".npy"):
        return _many_samples(path, inputs)
    raise EdgeError(f"cannot read calibration data {path}: not a folder, .npz or .npy", "give a folder of .npy/.npz files, one .npz, or 'random'")


def _read(path: Path) -> dict[str, np.ndarray] | np.ndarray:
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as e:
        raise EdgeError(f"{path}: not a readable {path.suffix} file ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


def _keyed(path: Path, data, inputs: list[TensorSpec]) -> dict[str, np.ndarray]:
    names = [s.name for s in inputs]
    if isinstance(data, np.ndarray):
        if len(inputs) != 1:
            raise EdgeError(f"{path}: a .npy holds one array, the model takes {len(inputs)} inputs ({', '.join(names)})",
                            "save each sample as a .npz keyed by input name: np.savez(f, " + ", ".join(f"{n}=..." for n in names) + ")")
        return {names[0]: data}
    if len(inputs) == 1 and len(data) == 1 and names[0] not in data:  # a single-input model: accept any one key
        return {names[0]: next(iter(data.values()))}
    missing = [n for n in names if n not in data]
    if missing:
        raise EdgeError(f"{path}: no array for input {missing[0]!r} (it has {', '.join(sorted(data)) or 'none'})",
                        f"key the arrays by the model's input names: {', '.join(names)}")
    extra = sorted(set(data) - set(names))
    if extra:
        raise EdgeError(f"{path}: array {extra[0]!r} is not an input of the model", f"the model's inputs are {', '.join(names)}")
    return {n: data[n] for n in names}


def _dtype(path: Path, name: str, array: np.ndarray, dtype: str) -> np.ndarray:
    want = np.dtype(dtype)
    if array.dtype == want:
        return array
    same_kind = (np.issubdtype(array.dtype, np.floating) and np.issubdtype(want, np.floating)) or \
                (np.issubdtype(array.dtype, np.integer) and np.issubdtype(want, np.integer))
    if not same_kind:
        raise EdgeError(f"{path}: input {name!r} is {array.dtype}, the model takes {dtype}", f"save it as {dtype}")
    converted = array.astype(want)
    if np.issubdtype(want, np.integer) and not np.array_equal(converted, array):
        raise EdgeError(f"{path}: input {name!r} has values that do not fit {dtype}")
    return converted


def _finite(path: Path, name: str, array: np.ndarray) -> None:
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise EdgeError(f"{path}: input {name!r} has NaN or infinite values")


def _one_sample(path: Path, inputs: list[TensorSpec]) -> Sample:
    data = _keyed(path, _read(path), inputs)
    sample = {}
    for spec in inputs:
        array = np.asarray(data[spec.name])
        shape = tuple(spec.shape)
        if array.shape != shape:
            if shape[:1] == (1,) and array.shape == shape[1:]:  # batch axis left out
                array = array[None]
            else:
                raise EdgeError(f"{path}: input {spec.name!r} has shape {list(array.shape)}, the model takes {list(shape)}",
                                "one sample per file, in the model's shape")
        array = _dtype(path, spec.name, array, spec.dtype)
        _finite(path, spec.name, array)
        sample[spec.name] = np.ascontiguousarray(array)
    return sample


def _many_samples(path: Path, inputs: list[TensorSpec]) -> list[Sample]:
    data = _keyed(path, _read(path), inputs)
    stacks, counts = {}, {}
    for spec in inputs:
        array = np.asarray(data[spec.name])
        shape = tuple(spec.shape)
        if array.shape[1:] == shape:
            stack = array
        elif shape[:1] == (1,) and array.shape[1:] == shape[1:] and array.ndim == len(shape):
            stack = array[:, None]  # [N, *shape[1:]] for a batch-1 input
        elif array.shape == shape:
            stack = array[None]  # just one sample
        else:
            raise EdgeError(f"{path}: input {spec.name!r} has shape {list(array.shape)}, expected [N, {', '.join(map(str, shape))}] "
                            f"(N samples of the model's shape {list(shape)})")
        stack = _dtype(path, spec.name, stack, spec.dtype)
        _finite(path, spec.name, stack)
        stacks[spec.name], counts[spec.name] = stack, len(stack)
    if len(set(counts.values())) != 1:
        raise EdgeError(f"{path}: the inputs have different sample counts ({', '.join(f'{k}: {v}' for k, v in counts.items())})")
    count = next(iter(counts.values()))
    if count == 0:
        raise EdgeError(f"{path}: no samples (the sample axis is empty)")
    return [{n: np.ascontiguousarray(stacks[n][i]) for n in stacks} for i in range(count)]


def fingerprint(sample: Sample) -> str:
    digest = hashlib.sha256()
    for name in sorted(sample):
        digest.update(name.encode())
        digest.update(str(sample[name].dtype).encode())
        digest.update(np.ascontiguousarray(sample[name]).tobytes())
    return digest.hexdigest()


def split(calib: list[Sample], eval: list[Sample] | None = None, *, eval_fraction: float = 0.2,
          seed: int = 0) -> tuple[list[Sample], list[Sample], str]:
    """(calibration samples, evaluation samples, a note saying where each came from).

    With no eval set, a seeded shuffle of ``calib`` is split: ``eval_fraction`` (at least one sample) held
    out for evaluation, the rest for calibration. With an eval set, it must share no sample with ``calib``.
    """
    if not calib:
        raise EdgeError("no calibration samples")
    if eval is not None:
        if not eval:
            raise EdgeError("no evaluation samples")
        seen = {fingerprint(s) for s in calib}
        shared = sum(fingerprint(s) in seen for s in eval)
        if shared:
            raise EdgeError(f"{shared} of the {len(eval)} evaluation samples are also calibration samples",
                            "evaluate on samples the quantizer has not seen: give --eval a disjoint set")
        return list(calib), list(eval), f"{len(calib)} calibration samples, {len(eval)} evaluation samples (given)"
    # identical samples go to the same side, so the two sets are disjoint even when the data has duplicates
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(calib):
        groups.setdefault(fingerprint(s), []).append(i)
    if len(groups) < 2:
        raise EdgeError("one distinct sample cannot be split into calibration and evaluation sets", "give more samples, or an --eval set")
    keys = list(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    want = max(1, round(len(calib) * eval_fraction))
    held: list[int] = []
    for k in order[:-1]:  # at least one group stays for calibration
        if len(held) >= want:
            break
        held += groups[keys[k]]
    held_set = set(held)
    held, kept = sorted(held), [i for i in range(len(calib)) if i not in held_set]
    note = f"no --eval set: {len(calib)} samples split {len(kept)}/{len(held)} into calibration/evaluation"
    return [calib[i] for i in kept], [calib[i] for i in held], note


def prepare(calib: str | Path | None, eval: str | Path | None, inputs: list[TensorSpec]) -> tuple[list[Sample], list[Sample], str]:
    """``load_samples`` + ``split`` for a build: (calibration, evaluation, note). No --calib: "random" with its warning."""
    calib_samples = load_samples(calib if calib is not None else RANDOM, inputs)
    eval_samples = None
    if eval is not None:
        # "random" for eval too: other seeds than the calibration's, so the sets stay disjoint
        eval_samples = load_samples(eval, inputs, random_count=max(4, RANDOM_COUNT // 4), random_seed=9000) \
            if str(eval) == RANDOM else load_samples(eval, inputs)
    calib_samples, eval_samples, note = split(calib_samples, eval_samples)
    if calib is None:
        note += " (random: no --calib)"
    return calib_samples, eval_samples, note
