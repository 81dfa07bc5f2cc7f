"""A build is data: one recipe holds every option that decides the package, is validated once where it is
made, flows through the stages, and goes into the manifest verbatim (``manifest["recipe"]``), so a package
says exactly how to rebuild it:

    recipe = Recipe("zoo:kws-cnn", target="x86_64", quantize="int8", calib="random")
    edgellm.build(recipe.source, recipe, "kws.edgepkg")
    edgellm.build("zoo:kws-cnn", Recipe.load("kws.edgepkg"))      # rebuild from a package (or manifest.json)

A new option is one field below (with its default); ``to_dict`` / ``from_dict`` and the keyword
conveniences of ``edgellm.build`` follow the fields. Where it is not output (``-o``) or presentation
(``--json``, progress), it belongs here.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from edgellm.errors import EdgeError

from edgellm.precision import PRECISIONS  # noqa: F401  (fp32 bf16 fp16 int8 auto: edgellm/precision.py)
PYTHON_FN = "python:"  # a finetune given as a Python function: recorded by name, given again to rebuild


@dataclass(frozen=True)
class Recipe:
    source: str  # model.onnx | program.pt2 | file.py:fn | zoo:NAME
    target: str = "host"  # name, .toml path or inline JSON; "host" is stored as the name it resolved to
    backend: str = "default"  # default: the target's first backend; auto: every allowed one, keep the fastest correct
    input_shapes: dict[str, list[int]] = field(default_factory=dict)  # {"x": [1, 3, 224, 224]}; also ["x=1x3x224x224"]
    input_values: dict = field(default_factory=dict)  # ONNX inputs frozen to constants: {"sr": 16000}; also ["sr=16000"]
    sample: str | None = None  # .npz of the inputs to trace, verify and store as the reference sample [default: random]
    pipeline: str = "default"  # TVM CPU pipeline (edgellm/backends/tvm_pipelines.py)
    tolerance: float = 1e-4  # max |error| vs the fp32 reference, relative to the output scale
    precision: str = "fp32"  # fp32 | bf16 | fp16 | int8 (= quantize int8) | auto (edgellm/precision.py)
    prune: float | None = None  # share of channels / FFN units / heads (structured) or weights (unstructured)
    prune_mode: str = "structured"
    prune_importance: str = "l2"
    finetune: str | None = None  # "file.py:fn" run on the pruned model; "python:NAME" when given as a function
    quantize: str | None = None  # int8 | int8-weights
    calib: str | None = None  # calibration samples: folder, .npz or "random"
    eval: str | None = None  # evaluation samples [default: 20% held out of calib]
    max_drop: float | None = None  # fail if accuracy vs fp32 drops more than this (percentage points)
    tune: int | None = None  # TVM: MetaSchedule trials in all
    tuning_db: str | None = None  # TVM: tuning database folder
    tune_budget: float | None = None  # TVM: seconds after which no new tuning task starts
    tune_remote: str | None = None  # TVM: measure tuning candidates on the fleet's devices, TRACKER_HOST:PORT/KEY
    weights: str | None = None  # language models: fp32 | int8 | int4 (edgellm/llm/weights.py) [default fp32]
    max_seq_len: int | None = None  # language models: tokens the KV cache holds [default 1024]

    @property
    def is_language_model(self) -> bool:
        from edgellm.llm.source import is_lm_source

        return is_lm_source(self.source)

    def __post_init__(self):
        from edgellm import targets

        tgt = targets.resolve(self.target)  # a Target object, a name, "host", a file or inline JSON
        if isinstance(self.target, targets.Target) or self.target == "host":
            object.__setattr__(self, "target", tgt.name)
        object.__setattr__(self, "_target", tgt)
        object.__setattr__(self, "input_shapes", _shapes(self.input_shapes))
        from edgellm.trace import parse_values

        object.__setattr__(self, "input_values", parse_values(list(self.input_values) if isinstance(self.input_values, (list, tuple))
                                                             else self.input_values))
        if self.sample is not None:
            object.__setattr__(self, "sample", str(self.sample))
        if self.tuning_db is not None:
            object.__setattr__(self, "tuning_db", str(self.tuning_db))
        if self.precision == "int8" and self.quantize is None:  # one concept, two spellings: --precision int8 / --quantize int8
            object.__setattr__(self, "quantize", "int8")
        elif self.quantize == "int8" and self.precision == "fp32":
            object.__setattr__(self, "precision", "int8")
        self._validate(tgt)

    def _validate(self, tgt) -> None:
        """Every bad combination of options, refused here in one line (backend capabilities: at compile)."""
        from edgellm import backends
        from edgellm.compress.plan import check_options

        if self.is_language_model:
            return self._validate_language_model(tgt)
        if self.weights is not None or self.max_seq_len is not None:
            raise EdgeError("--weights / --max-seq-len are for language models", "give a .gguf file, a transformers folder or zoo:smollm2-135m")
        from edgellm import precision

        precision.check(tgt, self.precision, self.backend)
        if self.precision == "int8" and self.quantize != "int8":
            raise EdgeError(f"--precision int8 is --quantize int8, not --quantize {self.quantize}", "give one of them")
        if self.quantize is not None and self.precision not in ("fp32", "int8"):
            raise EdgeError(f"--precision {self.precision} does not combine with --quantize {self.quantize}",
                            "--precision auto tries int8 itself" if self.precision == "auto" else "pick one precision")
        if self.precision in ("fp16", "bf16") and self.prune is not None:
            raise EdgeError(f"--precision {self.precision} does not combine with --prune yet", f"build with --precision {self.precision} alone")
        check_options(self.prune, self.prune_mode, self.quantize, self.calib, self.eval, self.max_drop, self.finetune,
                      auto=self.precision == "auto")
        if self.backend not in ("auto", "default"):
            if self.backend not in backends.KNOWN:
                raise EdgeError(f"unknown backend {self.backend!r}", f"known backends: default, auto, {', '.join(backends.KNOWN)}")
            if self.backend not in tgt.backends:
                raise EdgeError(f"target {tgt.name} does not allow backend {self.backend!r}", f"allowed: {', '.join(tgt.backends)}")
        if (self.tune or self.tuning_db) and self.precision == "fp16" and tgt.tvm.get("kind") == "llvm":
            raise EdgeError("--tune / --tuning-db do not combine with --precision fp16 yet", "build fp16 without tuning")
        if (self.tune or self.tuning_db) and "tvm" not in self.candidates():
            raise EdgeError("--tune / --tuning-db apply to the TVM backend", "use --backend tvm")
        if self.tune_remote:
            from edgellm.fleet.remote import Remote

            if not self.tune:
                raise EdgeError("--remote measures tuning candidates on devices: it needs --tune N")
            Remote.parse(self.tune_remote)

    def _validate_language_model(self, tgt) -> None:
        given = [flag for flag, value in (("--prune", self.prune), ("--quantize", self.quantize), ("--calib", self.calib),
                                          ("--tune", self.tune), ("--tuning-db", self.tuning_db), ("--input-shape", self.input_shapes),
                                          ("--input-value", self.input_values), ("--sample", self.sample),
                                          ("--finetune", self.finetune), (f"--precision {self.precision}", self.precision != "fp32")) if value]
        if self.backend not in ("default", "tvm"):
            given.append(f"--backend {self.backend}")
        if given:
            raise EdgeError(f"{given[0]} does not apply to a language model",
                            "language models take --weights fp32|int8|int4, --max-seq-len, --max-drop and --tolerance (TVM backend)")
        if self.weights not in (None, "fp32", "int8", "int4"):
            raise EdgeError(f"unknown --weights {self.weights!r}", "choose one of fp32, int8, int4")
        if "tvm" not in tgt.backends or tgt.tvm.get("kind") != "llvm":
            raise EdgeError(f"language models compile for CPU targets (TVM llvm) in this edgellm; {tgt.name} is not one",
                            "build for x86_64, arm64, rpi4, rpi5 or jetson-orin-cpu")

    @property
    def resolved_target(self):
        """The Target this recipe builds for (resolved once, when the recipe was made)."""
        return self._target

    def candidates(self) -> list[str]:
        """The backends to try: the one asked for, the target's first that runs the precision (default), or all
        it allows (auto; and for --precision auto, all of them too)."""
        from edgellm.precision import backends_for

        able = backends_for(self._target, self.precision)
        if self.backend == "auto" or (self.backend == "default" and self.precision == "auto"):
            return able
        if self.backend == "default":
            return able[:1]
        return [self.backend]

    def trials(self) -> list[tuple[str, str]]:
        """(backend, precision) pairs to build: one per candidate backend, or for --precision auto every
        precision the target allows with each (edgellm/precision.py)."""
        from edgellm.precision import candidates

        if self.precision == "auto":
            return candidates(self._target, self.candidates())
        return [(b, self.precision) for b in self.candidates()]

    def replace(self, **changes) -> Recipe:
        """A new recipe with some fields changed (validated again, as a whole)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"Recipe has no field {', '.join(unknown)}")
        if "target" not in changes:  # a Target given as an object, or "host": the one resolved, again
            changes["target"] = self._target if self.target == self._target.name else self.target
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, **changes) -> Recipe:
        """A recipe from its dict (as a manifest stores it), with ``changes`` applied; unknown keys refused."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise EdgeError(f"the recipe has unknown fields {unknown}", "it was written by a newer edgellm; upgrade edgellm")
        merged = {**data, **changes}
        if "source" not in merged:
            raise EdgeError("the recipe names no source", "give the model as SOURCE")
        return cls(**merged)

    @classmethod
    def load(cls, path: str | Path, **changes) -> Recipe:
        """The recipe of an .edgepkg, a manifest.json or a recipe .json file, with ``changes`` applied.

        From a package or manifest, a target that no longer resolves to the one the package was built
        for (a user's target file gone or edited) is taken from the manifest itself."""
        data, manifest = _read(Path(path))
        if manifest is not None and "target" not in changes:
            changes["target"] = _same_target(data.get("target", "host"), manifest.get("target"))
        return cls.from_dict(data, **changes)


def _shapes(shapes) -> dict[str, list[int]]:
    from edgellm.trace import parse_shapes

    return {k: list(v) for k, v in parse_shapes(list(shapes) if isinstance(shapes, (list, tuple)) else shapes).items()}


def _read(path: Path) -> tuple[dict, dict | None]:
    """(recipe dict, manifest or None) from a package, a manifest.json or a recipe .json."""
    if not path.is_file():
        raise EdgeError(f"recipe file {path} does not exist", "give a .edgepkg, its manifest.json or a recipe .json")
    if zipfile.is_zipfile(path):
        from edgellm.runtime.package import read_manifest

        manifest = read_manifest(path)
    else:
        try:
            manifest = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EdgeError(f"cannot read recipe file {path}: {e}", "give a .edgepkg, its manifest.json or a recipe .json") from None
        if not isinstance(manifest, dict):
            raise EdgeError(f"recipe file {path} is not a JSON object")
        if "recipe" not in manifest:  # a recipe .json: the recipe itself
            return manifest, None
    if not isinstance(manifest.get("recipe"), dict):
        raise EdgeError(f"{path} holds no build recipe", "it was built by an edgellm before recipes; build it from its source")
    return manifest["recipe"], manifest


def _same_target(spec: str, built_for: dict | None) -> str:
    from edgellm import targets

    if built_for is None:
        return spec
    try:
        if targets.resolve(spec).to_dict() == built_for:
            return spec
    except EdgeError:
        pass
    return json.dumps(built_for)


def make(source: str, target="host", finetune: str | Callable | None = None, **options) -> tuple[Recipe, Callable | None]:
    """(recipe, finetune function or None) from ``edgellm.build``'s arguments: the recipe given as ``target``
    with ``options`` (those given only) applied, or a new one. ``fp16=True`` is ``precision="fp16"``; a
    function as ``finetune`` is recorded as python:NAME and handed to the prune stage."""
    if "fp16" in options:
        fp16 = options.pop("fp16")
        if fp16 and options.get("precision") not in (None, "fp16"):
            raise EdgeError(f"--fp16 is --precision fp16; --precision {options['precision']} was given too", "give one of them")
        if fp16 or "precision" not in options:
            options["precision"] = "fp16" if fp16 else options.get("precision", "fp32")
    fn = None
    if callable(finetune):
        fn, finetune = finetune, PYTHON_FN + getattr(finetune, "__qualname__", repr(finetune))
    if finetune is not None:
        options["finetune"] = finetune
    unknown = sorted(set(options) - {f.name for f in fields(Recipe)})
    if unknown:
        raise TypeError(f"build() got unexpected keyword arguments {unknown}")
    if isinstance(source, Recipe):  # build(recipe)
        source, target = source.source, source
    if isinstance(target, Recipe):
        recipe = target.replace(source=source, **options) if options or source != target.source else target
    else:
        recipe = Recipe(source=source, target=target, **options)
    if fn is None and str(recipe.finetune or "").startswith(PYTHON_FN):
        raise EdgeError(f"this recipe's finetune was a Python function ({recipe.finetune[len(PYTHON_FN):]})",
                        "give it again: build(..., finetune=fn), or --finetune FILE.py:FN")
    return recipe, fn


BuildRecipe = Recipe  # the name before every build option moved in
