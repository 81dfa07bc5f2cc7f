"""Language-model packages from transformers folders: tokens equal transformers' own, the KV cache reused
across turns, sampling, threads, and the mistakes a user makes told in one line."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

import edgellm.runtime as rt
from tests.conftest import ROOT, import_blocker, run_cli
from tests.llm.conftest import PROMPT, hf_greedy, make_folder

pytestmark = pytest.mark.slow  # each package compiles (~10 s on 2 cores)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_fp32_greedy_equals_transformers(arch, tiny_folders, tiny_packages):
    lm = rt.load(tiny_packages(arch))
    assert lm.generate(PROMPT, 32, ignore_eos=True) == hf_greedy(tiny_folders[arch], PROMPT, 32)


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_compressed_packages_verify_and_report_accuracy(weights, tiny_packages):
    lm = rt.load(tiny_packages("llama", weights))
    verification = lm.manifest["verification"]
    assert verification["status"] == "passed" and verification["tokens_equal"]
    check = lm.check_reference()
    assert check["passed"] and check["tokens_equal"]
    accuracy = lm.manifest["llm"]["accuracy"]
    assert 0.0 <= accuracy["greedy_agreement"] <= 1.0


def test_kv_cache_is_reused_across_turns(tiny_packages):
    """A second turn that extends the first prefills only what is new, and answers as a fresh model would."""
    lm = rt.load(tiny_packages("llama"))
    first = lm.generate(PROMPT, 8, ignore_eos=True)
    turn2 = PROMPT + first + [5, 6, 7]
    cached_before = list(lm._cached)
    again = lm.generate(turn2, 8, ignore_eos=True)
    assert cached_before == (PROMPT + first)[: len(cached_before)]
    fresh = rt.load(tiny_packages("llama")).generate(turn2, 8, ignore_eos=True)
    assert again == fresh
    # a prompt that diverges from the cache drops the stale part
    assert lm.generate(PROMPT, 8, ignore_eos=True) == first


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_packages):
    lm = rt.load(tiny_packages("llama"))
    greedy = lm.generate(PROMPT, 12, ignore_eos=True)
    assert lm.generate(PROMPT, 12, temperature=0.8, top_k=1, seed=5, ignore_eos=True) == greedy
    a = lm.generate(PROMPT, 12, temperature=1.5, top_p=0.95, seed=7, ignore_eos=True)
    b = lm.generate(PROMPT, 12, temperature=1.5, top_p=0.95, seed=7, ignore_eos=True)
    assert a == b
    assert list(lm.stream(PROMPT, 12, ignore_eos=True)) == greedy
    assert lm.generate(PROMPT, 40, stop=[greedy[3]], ignore_eos=True) == greedy[:4]


def test_threads_get_what_one_thread_gets(tiny_packages):
    lm = rt.load(tiny_packages("qwen2"))
    prompts = [PROMPT[i:] for i in range(4)]
    expected = [lm.generate(p, 10, ignore_eos=True) for p in prompts]
    got: dict[int, list[int]] = {}

    def work(i):
        for _ in range(3):
            got[i] = lm.generate(prompts[i], 10, ignore_eos=True)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(4)] == expected


def test_a_host_build_times_decode_per_thread_count_and_load_uses_the_best(tiny_packages, tmp_path, monkeypatch):
    """Decode is cheap to time (a short greedy generation), so language models get the same record as models."""
    from edgellm.runtime import device, threads

    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path))
    path = tiny_packages("qwen2")
    rec = rt.read_manifest(path)["threads"]
    assert rec["work"] == threads.LM_WORK and rec["cpu"] == device.cpu_model()
    assert list(rec["p50_ms"]) == [str(k) for k in threads.counts()] and rec["best"] in threads.counts()
    lm = rt.load(path)
    assert (lm.threads, lm.threads_from) == (rec["best"], "measured on this CPU at build time")
    before = lm.generate(PROMPT, 6, ignore_eos=True)
    again = threads.measure_lm(lm)  # the device-side measurement leaves the model as it was
    assert list(again["p50_ms"]) == list(rec["p50_ms"])
    assert lm.generate(PROMPT, 6, ignore_eos=True) == before
    assert rt.load(path, threads=1).threads == 1


def test_perplexity_matches_the_reference(tiny_folders, tiny_packages):
    import torch
    import transformers

    lm = rt.load(tiny_packages("qwen3"))
    ids = np.random.default_rng(1).integers(0, 256, 200).tolist()
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_folders["qwen3"], dtype=torch.float32).eval()
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert lm.perplexity(ids) == pytest.approx(float(torch.exp(loss)), rel=1e-4)


def test_mistakes_are_one_line(tiny_folders, tiny_packages, kws_pkg, tmp_path):
    lm = rt.load(tiny_packages("llama"))
    with pytest.raises(rt.lm.GenerationError, match="more than this package's max-seq-len"):
        lm.generate(list(range(3, 250)) * 3, 4)
    with pytest.raises(rt.lm.GenerationError, match="no tokenizer|no chat template"):
        lm.chat("hello")
    with pytest.raises(rt.lm.GenerationError, match="is a language model"):
        lm.run(np.zeros((1, 4), np.int32))
    with pytest.raises(Exception, match="is not a language model"):
        rt.load(kws_pkg).generate([1, 2, 3])

    bad = make_folder("llama", tmp_path / "gpt", seed=1)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    out = tmp_path / "x.edgepkg"
    proc = run_cli("build", str(bad), "-o", str(out))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "model_type 'gpt_neox' is not supported" in proc.stderr and "qwen3" in proc.stderr
    assert not out.exists()

    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    proc = run_cli("build", str(gguf), "-o", str(out))
    assert proc.returncode == 2 and "not a readable GGUF file" in proc.stderr and proc.stderr.count("\n") == 1
    proc = run_cli("build", str(tiny_folders["llama"]), "--weights", "int4", "--quantize", "int8", "-o", str(out))
    assert proc.returncode == 2 and "does not apply to a language model" in proc.stderr
    assert not out.exists()


def test_runtime_generates_without_the_compiler_side(tiny_packages):
    script = import_blocker("torch", "transformers", "onnx", "click", "rich", "tvm.relax", "tvm.s_tir", "edgellm.api",
                            "edgellm.backends", "edgellm.llm", "edgellm.cli") + r"""
import json
import edgellm.runtime as rt
lm = rt.load(sys.argv[1], threads=1)
tokens = lm.generate(json.loads(sys.argv[2]), 8, ignore_eos=True)
check = lm.check_reference()
maps = open("/proc/self/maps").read()
print(json.dumps({"tokens": tokens, "passed": check["passed"], "compiler_mapped": "libtvm_compiler" in maps,
                  "heavy": sorted({k.split(".")[0] for k in sys.modules} & {"torch", "transformers", "onnx", "click"})}))
"""
    pkg = tiny_packages("llama")
    proc = subprocess.run([sys.executable, "-c", script, str(pkg), json.dumps(PROMPT)], capture_output=True, text=True, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["passed"] and not result["compiler_mapped"] and result["heavy"] == []
    assert result["tokens"] == rt.load(pkg).generate(PROMPT, 8, ignore_eos=True)


@pytest.mark.arm64
def test_rpi5_int4_package_generates_the_x86_tokens_under_emulation(tiny_folders, tiny_packages, tmp_path):
    from edgellm import api
    from edgellm.verify import verify

    built = api.build(str(tiny_folders["qwen2"]), "rpi5", tmp_path / "qwen2-rpi5.edgepkg", weights="int4")
    assert built.manifest["verification"]["status"] == "skipped"
    result = verify(built.path)
    assert result["passed"], result["problem"]
    x86 = rt.load(tiny_packages("qwen2", "int4"))
    prompt = x86._reference["prompt"].tolist()
    assert result["tokens"] == x86.generate(prompt, len(result["tokens"]), ignore_eos=True)


def test_bench_times_the_package_beside_transformers(tiny_folders, tmp_path):
    from edgellm.llm.bench import bench_lm, format_table, write_html

    report = bench_lm(str(tiny_folders["llama"]), ("int4",), threads=1, prompt_len=24, gen_len=8, runs=1, build_dir=tmp_path)
    engines = report["engines"]
    assert {"edgellm-int4", "transformers-fp32"} <= set(engines) and "llama.cpp" in report["skipped"]
    for e in engines.values():
        assert e["decode_tok_s"] > 0 and e["prefill_tok_s"] > 0 and len(e["new_tokens"]) == 8
    assert engines["transformers-fp32"]["decode_vs_best_peer"] == 1.0
    assert "edgellm-int4" in format_table(report)
    write_html(report, tmp_path / "lm.html")
    assert "data:image/png;base64," in (tmp_path / "lm.html").read_text()
