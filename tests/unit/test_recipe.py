"""edgellm.recipe.Recipe: every build option in one frozen object, validated where it is made, read back
from a package's manifest (or a recipe .json) with changes applied."""

import dataclasses
import inspect
import json

import pytest

from edgellm import api
from edgellm.errors import EdgeError
from edgellm.recipe import PYTHON_FN, Recipe, make


def test_defaults_resolve_host_and_round_trip_through_a_dict():
    r = Recipe("zoo:kws-cnn", input_shapes=["features=1x1x49x40"])
    assert r.target != "host" and r.resolved_target.name == r.target  # stored as the name "host" resolved to
    assert r.input_shapes == {"features": [1, 1, 49, 40]}
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d and Recipe.from_dict(d) == r
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.prune = 0.5


def test_every_build_option_is_a_recipe_field():
    """api.build takes the recipe's fields as keywords; adding a field is one line in recipe.py."""
    names = {f.name for f in dataclasses.fields(Recipe)}
    assert {"source", "target", "backend", "input_shapes", "pipeline", "tolerance", "precision", "prune", "prune_mode",
            "prune_importance", "finetune", "quantize", "calib", "eval", "max_drop", "tune", "tuning_db", "tune_budget"} <= names
    keywords = set(inspect.signature(api.build).parameters) - {"source", "target", "output", "progress", "verbose", "fields", "fp16"}
    assert keywords <= names and names - keywords == {"source", "target"}  # the rest through **fields
    with pytest.raises(TypeError, match="unexpected keyword"):
        make("zoo:kws-cnn", colour="red")


@pytest.mark.parametrize("options, message", [
    ({"fp16": True, "target": "x86_64"}, "target x86_64 cannot run fp16: edgellm's fp16 is for NVIDIA GPUs and arm64 cores"),
    ({"precision": "fp16", "target": "rpi4"}, r"target rpi4 cannot run fp16: its core lacks fp16 arithmetic"),
    ({"precision": "fp16", "target": "arm64"}, r"target arm64 cannot run fp16"),
    ({"target": "cuda-sm90", "fp16": True, "quantize": "int8"}, "--precision fp16 does not combine with --quantize int8"),
    ({"target": "rpi5", "precision": "fp16", "prune": 0.3}, "--precision fp16 does not combine with --prune"),
    ({"target": "rpi5", "precision": "fp16", "tune": 4}, "--tune / --tuning-db do not combine with --precision fp16"),
    ({"fp16": True, "precision": "int8"}, "--fp16 is --precision fp16; --precision int8 was given too"),
    ({"precision": "auto", "quantize": "int8"}, "--precision auto does not combine with --quantize int8"),
    ({"precision": "int8", "quantize": "int8-weights"}, "--precision int8 is --quantize int8, not --quantize int8-weights"),
    ({"quantize": "int4"}, "unknown --quantize 'int4'"),
    ({"prune": 1.5}, "--prune 1.5 is not between 0 and 1"),
    ({"calib": "random"}, "--calib, --eval and --max-drop go with --prune, --quantize or --precision int8 | auto"),
    ({"finetune": "x.py:f"}, "--finetune goes with --prune"),
    ({"backend": "onnxruntime"}, "unknown backend 'onnxruntime'"),
    ({"target": "arm64", "backend": "openvino"}, "target arm64 does not allow backend 'openvino'"),
    ({"target": "x86_64", "backend": "openvino", "tune": 4}, "--tune / --tuning-db apply to the TVM backend"),
    ({"precision": "bf16", "target": "x86_64"}, "target x86_64 cannot run bf16: its CPU features lack avx512_bf16 / amx_bf16"),
    ({"precision": "fp8"}, "unknown precision 'fp8'"),
    ({"target": "no-such-board"}, "unknown target 'no-such-board'"),
    ({"input_shapes": ["x=1xbad"]}, "cannot read --input-shape"),
])
def test_bad_combinations_are_refused_where_the_recipe_is_made(options, message):
    with pytest.raises(EdgeError, match=message) as e:
        make("zoo:kws-cnn", **options)
    assert "\n" not in str(e.value)


def test_replace_and_overrides_keep_the_rest():
    r = Recipe("zoo:kws-cnn", target="x86_64", quantize="int8", calib="random")
    r2, _ = make("zoo:mobilenet-v2", r, tolerance=1e-3)
    assert (r2.source, r2.target, r2.quantize, r2.calib, r2.tolerance) == ("zoo:mobilenet-v2", "x86_64", "int8", "random", 1e-3)
    assert make("zoo:kws-cnn", r)[0] is r
    with pytest.raises(EdgeError, match="--calib, --eval and --max-drop go with"):
        r.replace(quantize=None, precision="fp32")  # validated again, as a whole (precision int8 alone would bring int8 back)


def test_a_finetune_function_is_recorded_by_name_and_must_be_given_again():
    def my_training(module):
        return module

    r, fn = make("zoo:kws-cnn", prune=0.3, finetune=my_training)
    assert fn is my_training and r.finetune == PYTHON_FN + my_training.__qualname__
    with pytest.raises(EdgeError, match="finetune was a Python function"):
        make("zoo:kws-cnn", Recipe.from_dict(r.to_dict()))
    assert make("zoo:kws-cnn", Recipe.from_dict(r.to_dict()), finetune=my_training)[1] is my_training


def test_load_reads_a_manifest_or_a_recipe_json_with_changes(tmp_path):
    r = Recipe("zoo:kws-cnn", target="x86_64", prune=0.25)
    (tmp_path / "recipe.json").write_text(json.dumps(r.to_dict()))
    assert Recipe.load(tmp_path / "recipe.json") == r
    manifest = {"format_version": 1, "recipe": r.to_dict(), "target": r.resolved_target.to_dict()}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert Recipe.load(tmp_path / "manifest.json", tolerance=0.5) == r.replace(tolerance=0.5)
    # the package was built for a target that is no longer known here: the manifest's own target is used
    gone = {**r.resolved_target.to_dict(), "name": "gone-board"}
    (tmp_path / "old.json").write_text(json.dumps({**manifest, "recipe": {**r.to_dict(), "target": "gone-board"}, "target": gone}))
    loaded = Recipe.load(tmp_path / "old.json")
    assert loaded.resolved_target.to_dict() == gone
    (tmp_path / "future.json").write_text(json.dumps({**r.to_dict(), "warp_drive": True}))
    with pytest.raises(EdgeError, match="unknown fields"):
        Recipe.load(tmp_path / "future.json")
    with pytest.raises(EdgeError, match="does not exist"):
        Recipe.load(tmp_path / "missing.json")
    (tmp_path / "pre.json").write_text(json.dumps({"format_version": 1, "recipe": None}))
    with pytest.raises(EdgeError, match="holds no build recipe"):
        Recipe.load(tmp_path / "pre.json")


def test_int8_is_one_concept_with_two_spellings():
    """--quantize int8 and --precision int8 make the same recipe; --fp16 is --precision fp16."""
    assert make("zoo:kws-cnn", "x86_64", quantize="int8", calib="random")[0] == make("zoo:kws-cnn", "x86_64", precision="int8", calib="random")[0]
    r = make("zoo:kws-cnn", "x86_64", precision="int8", calib="random")[0]
    assert (r.precision, r.quantize) == ("int8", "int8")
    assert make("zoo:kws-cnn", "rpi5", fp16=True)[0].precision == "fp16"


def test_precision_picks_the_backends_that_run_it():
    amx = make("zoo:kws-cnn", "x86_64-amx", precision="bf16")[0]
    assert amx.candidates() == ["openvino"]  # the target's default is tvm; bf16 goes to OpenVINO first (AMX)
    assert make("zoo:kws-cnn", "x86_64-amx", precision="bf16", backend="tvm")[0].candidates() == ["tvm"]  # vdpbf16ps
    assert make("zoo:kws-cnn", "x86_64", precision="auto")[0].trials() == [
        ("tvm", "fp32"), ("openvino", "fp32"), ("tvm", "int8"), ("openvino", "int8")]
    assert {("openvino", "bf16"), ("tvm", "bf16")} <= set(make("zoo:kws-cnn", "x86_64-amx", precision="auto")[0].trials())
    assert make("zoo:kws-cnn", "rpi5", precision="auto")[0].trials() == [("tvm", "fp32"), ("tvm", "fp16"), ("tvm", "int8")]
    assert make("zoo:kws-cnn", "rpi4", precision="auto")[0].trials() == [("tvm", "fp32"), ("tvm", "int8")]
