"""The ``edgellm`` command line: each command a few lines over edgellm.api / edgellm.runtime."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from edgellm.errors import EdgeError


def _console(file=None):
    """Rich output on stderr; when that is not a terminal (a log, CI), lines are never wrapped."""
    from rich.console import Console

    stream = file or sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(file=file, stderr=file is None, highlight=False, soft_wrap=not tty, **({} if tty else {"width": 1000}))


def _own_stderr():
    """A file on a copy of fd 2: progress stays on the terminal while a build sends fd 2 to its log."""
    import os

    try:
        return os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
    except (AttributeError, OSError, ValueError):  # a replaced sys.stderr (a test runner)
        return None


def friendly(fn):
    """User mistakes become one line and exit code 2; Ctrl-C exits 130 and leaves nothing half-written."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgeError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)

    return wrapper


def _emit(data, as_json: bool, human) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        human(data)


class StageProgress:
    """Shows a spinner for the running stage and a line with its time when it ends."""

    def __init__(self, quiet: bool = False):
        self.file = None if quiet else _own_stderr()
        self.console = _console(self.file)
        self.quiet = quiet
        self.status = None

    def __call__(self, stage: str, seconds: float | None, detail: str) -> None:
        if self.quiet:
            return
        if seconds is None:
            self.close_status()  # the stage before failed (backend auto goes on with the next one)
            self.status = self.console.status(f"{stage} ...")
            self.status.start()
            return
        self.close_status()
        self.console.print(f"[green]✓[/green] {stage:<8} {seconds:6.1f} s  {detail}")

    def note(self, line: str) -> None:
        """A line of progress inside the running stage (e.g. one per tuning task)."""
        if not self.quiet:
            self.console.print(f"           {line}")

    def failed(self, stage: str, problem: str) -> None:
        """A stage that failed where the build goes on (backend auto: the next backend)."""
        self.close_status()
        if not self.quiet:
            self.console.print(f"[red]✗[/red] {stage:<8} {problem}", markup=True)

    def close_status(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None

    def close(self) -> None:
        self.close_status()
        if self.file is not None:
            self.file.close()
            self.file = None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgellm")
def main():
    """edgellm: trace, compile and package models for edge devices, then run and profile them."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@friendly
def targets(as_json):
    """List the known targets (bundled targets/*.toml, and the folders in EDGELLM_TARGETS) and where each came from."""
    from edgellm import targets as t

    known = {name: {**target.to_dict(), "origin": origin} for name, (target, origin) in t.found().items()}
    host = t.host().name

    def table(data):
        from rich.table import Table

        tab = Table("target", "arch", "backends", "has", "lacks", "from", "description", box=None)
        for name, d in data.items():
            tab.add_row(name + (" (host)" if name == host else ""), d["arch"], ",".join(d["backends"]),
                        " ".join(d["has"]), " ".join(d["lacks"]), d["origin"], d["description"])
        from rich.console import Console

        Console(width=240).print(tab)

    _emit({"host": host, "bundled": str(t.bundled_dir()), "user_dirs": [str(d) for d in t.user_dirs()], "targets": known}
          if as_json else known, as_json, table)


@main.command()
@click.argument("source", required=False)
@click.option("--recipe", "recipe_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="rebuild from a package's recipe: an .edgepkg, its manifest.json or a recipe .json (options given beside it override it)")
@click.option("-t", "--target", default="host", show_default=True, help="target name, .toml file, inline JSON, or host")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="the .edgepkg to write [default: NAME.edgepkg]")
@click.option("--backend", default="default", show_default=True, help="tvm, openvino, default (the target's first) or auto (build with each the target allows, keep the fastest correct)")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=1x3x224x224", help="override an input's shape")
@click.option("--input-value", "input_values", multiple=True, metavar="NAME=VALUE",
              help="ONNX: freeze an input to a constant (e.g. a sample rate: sr=16000), so branches on it fold away; it leaves the package's inputs")
@click.option("--sample", "sample_file", type=click.Path(dir_okay=False), metavar="FILE.npz",
              help="real inputs (NAME=array) to trace, verify and store as the reference sample [default: random draws]")
@click.option("--pipeline", default="default", show_default=True, help="TVM CPU pipeline: default, edgellm, stock")
@click.option("--tolerance", type=float, help="max error vs the fp32 reference, relative to output scale [default: 1e-4; language models: 1e-3 of the largest logit]")
@click.option("--prune", type=float, help="structured: remove this share of channels / FFN units / heads (0.3); unstructured: of weights")
@click.option("--prune-mode", type=click.Choice(["structured", "unstructured"]), default="structured", show_default=True)
@click.option("--prune-importance", type=click.Choice(["l1", "l2", "taylor"]), default="l2", show_default=True)
@click.option("--finetune", metavar="FILE.py:FN", help="with --prune: your fn(module) -> module, run on the pruned model (train it on your data)")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16", "int8", "auto"]),
              help="fp32 [default]; bf16: OpenVINO on AMX / AVX512-BF16 CPUs; fp16: GPUs and arm64 +fullfp16 (rpi5); int8 (= --quantize int8); "
                   "auto: build each the target allows, keep the fastest within --max-drop [default 1 pp]")
@click.option("--quantize", type=click.Choice(["int8", "int8-weights"]), help="int8 (= --precision int8): static PTQ (calibrated); int8-weights: weight-only (OpenVINO)")
@click.option("--calib", metavar="PATH|random", help="calibration samples: a folder of .npy/.npz, one .npz, or random")
@click.option("--eval", "eval_set", metavar="PATH|random", help="evaluation samples [default: 20% held out of --calib]")
@click.option("--max-drop", type=float, help="fail if accuracy vs fp32 drops more than this (percentage points)")
@click.option("--tune", type=click.IntRange(min=1), metavar="N", help="TVM: auto-tune with MetaSchedule for N trials in all (kept only where faster than edgellm's schedules)")
@click.option("--tuning-db", type=click.Path(file_okay=False), metavar="DIR", help="TVM: tuning database, shared across builds and models [default with --tune: ~/.cache/edgellm/tuning/<target>/]; given alone, applies it without tuning")
@click.option("--tune-budget", type=float, metavar="SECONDS", help="TVM: start no new tuning task after this long")
@click.option("--remote", "tune_remote", metavar="HOST:PORT/KEY", help="TVM: with --tune, measure candidates on the fleet's devices of KEY (every free one, in parallel) through the RPC tracker")
@click.option("--fp16", is_flag=True, help="= --precision fp16: fp16 arithmetic, fp32 accumulation; verified to cosine >= 0.999")
@click.option("--weights", type=click.Choice(["fp32", "int8", "int4"]), help="language models: weight compression [default: fp32]")
@click.option("--max-seq-len", type=click.IntRange(min=16), help="language models: longest prompt + reply the KV cache holds [default: 1024]")
@click.option("-v", "--verbose", is_flag=True, help="show what TVM, ONNX Runtime, OpenVINO and NNCF print, and a failing stage's traceback")
@click.option("--json", "as_json", is_flag=True, help="print the manifest as JSON when done")
@click.pass_context
@friendly
def build(ctx, source, recipe_file, target, output, backend, input_shapes, input_values, sample_file, pipeline, tolerance, prune, prune_mode,
          prune_importance, finetune, precision, quantize, calib, eval_set, max_drop, tune, tuning_db, tune_budget, tune_remote, fp16, weights, max_seq_len,
          verbose, as_json):
    """Build SOURCE (model.onnx, program.pt2, file.py:fn, zoo:NAME; a language model: model.gguf or a transformers folder) into an .edgepkg."""
    from click.core import ParameterSource

    from edgellm import api, crash_guard
    from edgellm.recipe import Recipe

    options = dict(target=target, backend=backend, input_shapes=list(input_shapes), input_values=list(input_values), sample=sample_file,
                   pipeline=pipeline, tolerance=tolerance, prune=prune,
                   prune_mode=prune_mode, prune_importance=prune_importance, finetune=finetune, precision=precision, quantize=quantize, calib=calib,
                   eval=eval_set, max_drop=max_drop, tune=tune, tuning_db=tuning_db, tune_budget=tune_budget, tune_remote=tune_remote,
                   fp16=fp16, weights=weights, max_seq_len=max_seq_len)
    if recipe_file:  # the recipe, with the options given on the command line in place of its own
        param = {"eval": "eval_set", "sample": "sample_file"}
        given = {k: v for k, v in options.items() if ctx.get_parameter_source(param.get(k, k)) == ParameterSource.COMMANDLINE}
        if "fp16" in given:
            given["precision"] = "fp16" if given.pop("fp16") else "fp32"
        recipe = Recipe.load(recipe_file, **({"source": source} if source else {}), **given)
    elif source:
        recipe = None
    else:
        raise EdgeError("build needs a SOURCE (model.onnx, program.pt2, file.py:fn or zoo:NAME) or --recipe FILE")

    @friendly
    def run_build():
        progress = StageProgress(quiet=as_json)
        try:
            if recipe is not None:
                result = api.build(recipe.source, recipe, output, progress=progress, verbose=verbose)
            else:
                result = api.build(source, target, output, progress=progress, verbose=verbose,
                                   **{k: v for k, v in options.items() if k != "target"})
        finally:
            progress.close()
        _emit(result.manifest, as_json, lambda m: _console().print(
            f"built {result.path} in {sum(result.seconds.values()):.1f} s: {m['model']['name']} for {m['target']['name']} ({m['backend']['name']}"
            + (f", {m['precision']['name']})" if m.get("precision") else ")")))

    crash_guard.run(run_build)  # a segfault inside TVM / OpenVINO / ORT still ends in one error line


@main.command("prune")
@click.argument("source")
@click.option("--ratio", type=float, required=True, help="share of channels / FFN units / heads (structured) or weights to remove")
@click.option("--mode", type=click.Choice(["structured", "unstructured"]), default="structured", show_default=True)
@click.option("--importance", type=click.Choice(["l1", "l2", "taylor"]), default="l2", show_default=True)
@click.option("--finetune", metavar="FILE.py:FN", help="your fn(module) -> module, run on the pruned model (train it on your data)")
@click.option("--round-to", type=click.IntRange(min=1), metavar="N",
              help="structured: keep channel counts multiples of N, e.g. 16 for AVX-512 (what `build` does for its target)")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="the pruned model, a .pt2 (torch.export)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@friendly
def prune_cmd(source, ratio, mode, importance, finetune, round_to, output, as_json):
    """Prune SOURCE (zoo:NAME or file.py:fn) into a .pt2 program that `edgellm build` takes."""
    from edgellm.compress.prune import prune_to_file
    from edgellm.source import load_function

    fn = load_function(finetune, "--finetune", "def NAME(module): ...train...; return module") if finetune else None
    report = prune_to_file(source, ratio, mode, importance, output, fn, round_to=round_to)
    _emit(report, as_json, lambda r: _console().print(r["summary"]))


@main.command("quantize")
@click.argument("source")
@click.option("--calib", required=True, metavar="PATH|random", help="calibration samples: a folder of .npy/.npz, one .npz, or random")
@click.option("--eval", "eval_set", metavar="PATH|random", help="evaluation samples [default: 20% held out of --calib]")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=1x3x224x224", help="override an input's shape")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="the quantized model, a QDQ .onnx")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@friendly
def quantize_cmd(source, calib, eval_set, input_shapes, output, as_json):
    """Quantize SOURCE to int8 (NNCF, calibrated) into a QDQ ONNX model that any ONNX runtime reads."""
    from edgellm.compress.onnx_int8 import quantize_onnx

    console = _console()
    report = quantize_onnx(source, output, calib, eval_set, list(input_shapes),
                           progress=None if as_json else lambda m: console.print(f"  {m}"))
    _emit(report, as_json, lambda r: console.print(r["summary"]))


def _signed(signature: dict | None) -> str:
    if signature is None:
        return "no"
    verified = ", verified against the trusted keys" if signature["verified"] else " (not verified: give --trusted-key)"
    return f"by key {signature['key_fingerprint'][:16]}… ({signature['algorithm']}){verified}"


@main.command()
@click.argument("package", type=click.Path())
@click.option("--trusted-key", "trusted_keys", multiple=True, metavar="KEY.pub",
              help="verify the whole package and its signature by this key (repeat for several)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@friendly
def inspect(package, trusted_keys, as_json):
    """Show a package's manifest: inputs, outputs, target, sizes, hashes, signature."""
    from edgellm import api

    def human(m):
        lines = [
            f"{m['package']['path']}  {m['package']['size'] / 1e6:.2f} MB  sha256 {m['package']['sha256'][:16]}…",
            f"  model     {m['model']['name']}  ({m['source']['kind']} {m['source']['ref']}, sha256 {m['source']['sha256'][:16]}…)",
            f"  weights   {m['model']['weights'] or '-'}",
            f"  target    {m['target']['name']} ({m['target']['arch']}; {m['target']['description']})",
            f"  backend   {m['backend']['name']} " + " ".join(f"{k}={v}" for k, v in m["backend"].items() if k not in ("name", "module")),
            "  inputs    " + ", ".join(f"{i['name']}: {i['dtype']}{i['shape']}" for i in m["inputs"]),
            "  outputs   " + ", ".join(f"{o['name']}: {o['dtype']}{o['shape']}" for o in m["outputs"]),
            f"  verified  {m['verification']['status']}" + (f", error {m['verification']['rel_max_abs']:.2g} of output scale" if m["verification"]["status"] == "passed" else ""),
            f"  built     {m['created']} by edgellm {m['edgellm_version']} (format {m['format_version']})",
            "  signed    " + _signed(m["package"]["signature"]),
        ]
        if "llm" in m:  # a language model
            lm, c = m["llm"], m["llm"]["config"]
            acc = lm.get("accuracy", {})
            lines.insert(3, f"  language  {c['arch']}, {c['layers']} layers, hidden {c['hidden']}, {c['heads']}/{c['kv_heads']} heads, vocab {c['vocab']}; "
                            f"weights {lm['weights']} ({lm['schemes']['layers']['kind']} layers, {lm['schemes']['head']['kind']} head); "
                            f"KV cache {lm['max_seq_len']} tokens; tokenizer {'yes' if lm['tokenizer'] else 'no'}, chat template "
                            f"{'yes' if lm.get('chat_template') else 'no'}")
            if "perplexity" in acc:
                lines.insert(4, f"  accuracy  perplexity {acc['perplexity']:.3f} on {acc['text_tokens']} tokens (fp32 {acc['perplexity_fp32']:.3f}), "
                                f"greedy agreement with fp32 {acc['greedy_agreement']:.0%}")
        lines.append("  files")
        lines += [f"    {name:<16} {f['size']:>10,} B  sha256 {f['sha256'][:16]}…" for name, f in m["files"].items()]
        click.echo("\n".join(lines))

    _emit(api.inspect(package, trusted_keys), as_json, human)


@main.command()
@click.argument("package", type=click.Path())
@click.option("-i", "--input", "inputs", multiple=True, help="x.npy, NAME=x.npy, or one inputs.npz [default: the package's sample]")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="write outputs to this .npz")
@click.option("--threads", type=int, help="CPU threads [default: all cores]")
@click.option("--trusted-key", "trusted_keys", multiple=True, metavar="KEY.pub",
              help="refuse the package unless signed by this key (repeat for several; adds to $EDGELLM_TRUSTED_KEYS)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@friendly
def run(package, inputs, output, threads, trusted_keys, as_json):
    """Run one inference of PACKAGE on inputs from files."""
    import numpy as np

    from edgellm import runtime
    from edgellm.runtime.__main__ import read_inputs

    model = runtime.load(package, threads=threads, trusted_keys=trusted_keys)
    if not isinstance(model, runtime.Model):
        model.run()  # a language model: the error says to generate instead
    outputs = model.run(**read_inputs(model, list(inputs)))
    if output:
        if not output.endswith(".npz"):
            raise EdgeError(f"output {output} should end in .npz")
        try:
            np.savez(output, **outputs)
        except OSError as e:
            raise EdgeError(f"cannot write {output}: {e.strerror}") from None
    summary = {n: {"shape": list(a.shape), "dtype": str(a.dtype), "head": a.ravel()[:8].round(5).tolist()} for n, a in outputs.items()}
    _emit(summary, as_json, lambda s: click.echo("\n".join(f"{n}: {v['dtype']}{v['shape']} {v['head']}…" for n, v in s.items())))


@main.command()
@click.argument("package", type=click.Path())
@click.option("-p", "--prompt", required=True, help="the message (the package's chat template is applied) or, with --raw, the prompt text")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, help="0: greedy")
@click.option("--top-k", default=0, show_default=True, help="0: no top-k cut")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--seed", type=int, help="sampling seed")
@click.option("--raw", is_flag=True, help="no chat template: continue the prompt text")
@click.option("--threads", type=int, help="CPU threads [default: all cores]")
@click.option("--trusted-key", "trusted_keys", multiple=True, metavar="KEY.pub",
              help="refuse the package unless signed by this key (repeat for several; adds to $EDGELLM_TRUSTED_KEYS)")
@click.option("--json", "as_json", is_flag=True, help="the reply, its token ids and timings as JSON")
@friendly
def generate(package, prompt, max_new_tokens, temperature, top_k, top_p, seed, raw, threads, trusted_keys, as_json):
    """Generate text with a language-model PACKAGE, streamed as it is made."""
    import time

    from edgellm import runtime

    lm = runtime.load(package, threads=threads, trusted_keys=trusted_keys)
    from edgellm.runtime.lm import LanguageModel

    if not isinstance(lm, LanguageModel):
        lm.generate()  # raises: not a language model
    text = prompt if raw else lm.apply_chat_template([{"role": "user", "content": prompt}])
    ids = lm.encode(text)
    t0 = time.perf_counter()
    tokens, first, shown = [], None, ""
    for token in lm.stream(ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed):
        first = first or time.perf_counter()
        if token in lm.eos_ids:
            break
        tokens.append(token)
        piece = lm.decode(tokens)
        if not as_json and not piece.endswith("\ufffd"):
            click.echo(piece[len(shown):], nl=False)
            shown = piece
    end = time.perf_counter()
    decode_s = (len(tokens) - 1) / (end - first) if first and len(tokens) > 1 and end > first else None
    result = {"text": lm.decode(tokens), "prompt_tokens": len(ids), "new_tokens": tokens, "ttft_ms": (first - t0) * 1e3 if first else None,
              "decode_tok_s": decode_s}
    if as_json:
        _emit(result, True, None)
    else:
        click.echo()
        _console().print(f"[dim]{len(ids)} prompt tokens, {len(tokens)} new; first token {result['ttft_ms']:.0f} ms"
                         + (f", {decode_s:.1f} tok/s" if decode_s else "") + "[/dim]")


@main.command()
@click.argument("packages", nargs=-1, required=True, metavar="PKG|NAME=PKG...")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on; 0.0.0.0: every interface (give an --api-key)")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0: any free port")
@click.option("--api-key", envvar="EDGELLM_API_KEY", help="require 'Authorization: Bearer KEY' (health probes excepted) [env EDGELLM_API_KEY]")
@click.option("--threads", type=int, help="CPU threads one call uses [default: all cores]; cores / threads calls run at once, per model")
@click.option("--trusted-key", "trusted_keys", multiple=True, metavar="KEY.pub",
              help="refuse packages not signed by this key (repeat for several; adds to $EDGELLM_TRUSTED_KEYS)")
@click.option("--max-body-mb", default=64.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="larger request bodies get 413")
@click.option("--json", "as_json", is_flag=True, help="the startup line as JSON: url, port, models")
@friendly
def serve(packages, host, port, api_key, threads, trusted_keys, max_body_mb, as_json):
    """Serve PACKAGES over HTTP until Ctrl-C: models over KServe v2 / Triton's protocol (/v2/models/NAME/infer), language
    models over OpenAI's API (/v1/chat/completions, /v1/completions). NAME: the file stem, or NAME=PKG."""
    from edgellm.serve import serve as run_server

    def announce(info):
        if as_json:
            click.echo(json.dumps(info))
            return
        names = ", ".join(f"{n} ({'language model' if m['kind'] == 'llm' else 'tensors'})" for n, m in info["models"].items())
        click.echo(f"serving {names} at {info['url']} (KServe v2 at /v2/models/NAME/infer"
                   + (", OpenAI at /v1/chat/completions" if any(m["kind"] == "llm" for m in info["models"].values()) else "")
                   + (", API key required" if info["api_key"] else "") + "; Ctrl-C stops)")
        if info["all_interfaces"]:
            click.echo("note: listening on every network interface" + ("" if info["api_key"] else ", without an API key: anyone who can reach "
                                                                       "this machine can call it (give --api-key)"))

    run_server(list(packages), host=host, port=port, api_key=api_key, threads=threads, trusted_keys=list(trusted_keys),
               max_body=int(max_body_mb * (1 << 20)), announce=announce)


@main.command()
@click.argument("package", type=click.Path())
@click.option("--runs", default=100, show_default=True)
@click.option("--warmup", default=10, show_default=True)
@click.option("--threads", type=int, help="CPU threads [default: all cores]")
@click.option("--per-op", is_flag=True, help="time per fused kernel")
@click.option("--prompt-len", default=128, show_default=True, type=click.IntRange(min=1), help="language models: prompt tokens")
@click.option("--gen-len", default=64, show_default=True, type=click.IntRange(min=2), help="language models: new tokens")
@click.option("--remote", help="run it on a device of the fleet instead: TRACKER_HOST:PORT/KEY (see `edgellm devices`)")
@click.option("--all", "every", is_flag=True, help="with --remote: on every device of the key, one report each")
@click.option("--trusted-key", "trusted_keys", multiple=True, metavar="KEY.pub",
              help="refuse the package unless signed by this key (repeat for several; adds to $EDGELLM_TRUSTED_KEYS)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (schema edgellm.profile/1, language models edgellm.lm-profile/1)")
@friendly
def profile(package, runs, warmup, threads, per_op, prompt_len, gen_len, remote, every, trusted_keys, as_json):
    """Latency p50/p90/p99, throughput, load time and memory of PACKAGE on this machine or on fleet devices (language
    models: time to first token, prefill and decode tokens/s, memory)."""
    from edgellm import runtime
    from edgellm.runtime.profile import format_report

    if runs < 1 or warmup < 0:
        raise EdgeError("--runs must be at least 1 and --warmup at least 0")
    if every and not remote:
        raise EdgeError("--all needs --remote HOST:PORT/KEY")
    if remote:
        _profile_remote(package, remote, every, {"runs": runs, "warmup": warmup, "threads": threads, "per_op": per_op,
                                                 "prompt_len": prompt_len, "gen_len": gen_len}, as_json)
        return
    model = runtime.load(package, threads=threads, trusted_keys=trusted_keys)
    from edgellm.runtime.lm import LanguageModel

    if isinstance(model, LanguageModel):
        from edgellm.runtime.profile import format_lm_report

        report = model.profile(prompt_len=prompt_len, gen_len=gen_len, runs=min(runs, 3))
        _emit(report, as_json, lambda r: click.echo(format_lm_report(r)))
        return
    report = model.profile(runs=runs, warmup=warmup, per_op=per_op)
    _emit(report, as_json, lambda r: click.echo(format_report(r)))


def _profile_remote(package, remote, every, options, as_json):
    """One report per device (``--all``: every device of the key); a device that failed is one line, the others report."""
    from edgellm.fleet.remote import Remote, run_remote
    from edgellm.runtime.profile import format_lm_report, format_report

    results = run_remote(package, Remote.parse(remote), "profile", options, every=every)
    if not every and "error" in results[0]:
        raise EdgeError(results[0]["error"])
    if as_json:
        _emit(results if every else results[0], True, None)
    else:
        for r in results:
            d = r.get("device") or {}
            click.echo(f"== {remote} {d.get('hostname', '')} pid {d.get('pid', '?')} {d.get('machine', '')}"
                       + (f" (emulated {d['emulated']}: not device speed)" if d.get("emulated") else ""))
            click.echo(f"error: {r['error']}" if "error" in r else
                       (format_lm_report(r) if r.get("schema", "").startswith("edgellm.lm-profile") else format_report(r)))
    if any("error" in r for r in results):
        sys.exit(2)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on (0.0.0.0 for the LAN)")
@click.option("--port", default=9190, show_default=True, help="first port to try (up to port+9)")
@friendly
def tracker(host, port):
    """TVM's RPC tracker: the pool that fleet devices (`edgellm agent`) join and `profile --remote` draws from."""
    import time

    from edgellm.fleet.remote import start_tracker

    t = start_tracker(host, port, port + 10)
    click.echo(f"tracker listening on {host}:{t.port} (Ctrl-C stops it); devices join with: edgellm agent --tracker HOST:{t.port} --key NAME", err=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        t.terminate()


@main.command()
@click.option("--tracker", "tracker_addr", required=True, help="the tracker, HOST:PORT")
@click.option("--key", required=True, help="the device type to pool this device under, e.g. rpi4")
@click.option("--host", default="0.0.0.0", show_default=True, help="address the RPC server listens on")
@click.option("--port", default=9090, show_default=True, help="first port to try")
@click.option("--emulate", help="run the agent in the emulated arm64 userland of this target (rpi4, rpi5, arm64): a real remote process, not device speed")
@friendly
def agent(tracker_addr, key, host, port, emulate):
    """A device of the fleet: TVM's RPC server registered under KEY, running packages with edgellm's runtime.
    On a device itself: `python -m edgellm.fleet.agent` (needs only edgellm[runtime])."""
    from edgellm.fleet.launch import start_agent

    a = start_agent(tracker_addr, key, emulate=emulate, host=host, port=port, progress=lambda m: click.echo(m, err=True))
    click.echo(f"agent {key} on port {a.info['port']} ({a.info['machine']}{', emulated ' + a.info['emulated'] if a.info.get('emulated') else ''}), "
               f"registered with {tracker_addr}; Ctrl-C stops it", err=True)
    sys.exit(a.wait())


@main.command()
@click.option("--tracker", "tracker_addr", required=True, help="the tracker, HOST:PORT")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@friendly
def devices(tracker_addr, as_json):
    """The fleet: each key, how many devices, how many free or busy, and where they are."""
    from edgellm.fleet.agent import parse_address
    from edgellm.fleet.remote import devices as fleet

    data = fleet(*parse_address(tracker_addr))

    def human(d):
        if not d["keys"]:
            click.echo(f"no devices at {d['tracker']}")
        for key, e in sorted(d["keys"].items()):
            click.echo(f"{key:<16} {e['total']} device(s), {e['free']} free, {e['busy']} busy, {e['pending']} waiting   {' '.join(e['devices'])}")

    _emit(data, as_json, human)


@main.command()
@click.argument("package", type=click.Path())
@click.option("--tolerance", type=float, default=None, help="max error vs the stored fp32 reference, relative to output scale [default: the package's own]")
@click.option("--qemu-cpu", help="emulated core [default: the target's qemu_cpu]")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@friendly
def verify(package, tolerance, qemu_cpu, as_json):
    """Run PACKAGE's reference sample on its device, emulated when it is arm64 (qemu-user)."""
    from edgellm.verify import verify as run_verify

    console = _console()
    result = run_verify(package, tolerance=tolerance, qemu_cpu=qemu_cpu, progress=None if as_json else lambda m: console.print(f"  {m}"))

    def human(r):
        where = f"emulated {r['arch']} ({r['qemu_cpu']}; emulated time is not device speed)" if r["emulated"] else f"this {r['arch']} machine"
        if r["passed"]:
            c = r.get("contract") or {}
            floor = f", cosine {r['cosine_min']:.6f} (floor {c['min_cosine']})" if "min_cosine" in c else ""
            click.echo(f"PASS {r['target']} on {where}: max error {r['max_abs']:.3g} ({r['rel_max_abs']:.3g} of output scale, "
                       f"tolerance {r['tolerance']:g}){floor} in {r['seconds']:.1f} s")
        else:
            click.echo(f"FAIL {r['target']} on {where}: {r['problem']}")

    _emit(result, as_json, human)
    if not result["passed"]:
        sys.exit(1)


@main.command()
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), metavar="NAME",
              help="write the private key to NAME (mode 0600) and the public key to NAME.pub")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@friendly
def keygen(output, as_json):
    """Make an Ed25519 key pair for signing packages: NAME (private, PEM PKCS8) and NAME.pub (public, 64 hex digits)."""
    from edgellm.signing import keygen as make_key

    result = make_key(output)
    _emit(result, as_json, lambda r: click.echo(
        f"wrote {r['private']} (private: keep it secret, sign with it) and {r['public']} (public: give it to devices)\n"
        f"key fingerprint {r['fingerprint']}"))


@main.command()
@click.argument("package", type=click.Path())
@click.option("--key", required=True, type=click.Path(dir_okay=False), metavar="NAME", help="the private key from `edgellm keygen -o NAME`")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="write the signed package here [default: sign PACKAGE in place]")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@friendly
def sign(package, key, output, as_json):
    """Sign PACKAGE's manifest (which holds every member's sha256) with an Ed25519 key; devices given the key's .pub
    (--trusted-key, $EDGELLM_TRUSTED_KEYS) then load only packages it signed."""
    from edgellm.signing import sign_package

    result = sign_package(package, key, output)
    _emit(result, as_json, lambda r: click.echo(f"signed {r['package']} with key {r['key_fingerprint'][:16]}… (member {r['member']})"))


@main.command("bundle-runtime")
@click.option("-t", "--target", default="host", show_default=True, help="target whose architecture the bundle is for")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="new folder to write")
@click.option("--python", "python_version", default="3.11", show_default=True, help="the device's CPython version")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@friendly
def bundle_runtime(target, output, python_version, as_json):
    """Write the files a device needs to run packages: edgellm's runtime + pinned, pruned TVM runtime wheels."""
    from edgellm import targets as t
    from edgellm.bundle import bundle_runtime as make_bundle

    console = _console()
    tgt = t.resolve(target)
    result = make_bundle(tgt.arch, Path(output), python_version, progress=None if as_json else lambda m: console.print(f"  {m}"),
                         cuda=tgt.tvm.get("kind") == "cuda")
    _emit(result, as_json, lambda r: click.echo(
        f"wrote {r['path']}: {r['size_bytes'] / 1e6:.1f} MB for {r['arch']} / CPython {r['python']} "
        f"(pruned {r['pruned_bytes'] / 1e6:.0f} MB of compiler and unused parts)\non the device: {r['usage']}"))


@main.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--runs", default=50, show_default=True)
@click.option("--warmup", default=5, show_default=True)
@click.option("--threads", default=2, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (schema edgellm.bench/1)")
@click.option("--html", type=click.Path(dir_okay=False), help="also write a page with a bar chart")
@click.option("--quantize", type=click.Choice(["int8", "int8-weights"]), help="also int8: edgellm's int8 packages and ONNX Runtime int8")
@click.option("--calib", default="random", show_default=True, metavar="PATH|random", help="calibration samples for --quantize")
@click.option("--tune", type=click.IntRange(min=1), metavar="N", help="also a TVM package tuned with N MetaSchedule trials (edgellm-tvm-tuned)")
@click.option("--tune-budget", type=float, metavar="SECONDS", help="with --tune: start no new tuning task after this long")
@click.option("--weights", "lm_weights", multiple=True, type=click.Choice(["fp32", "int8", "int4"]),
              help="language models: the packages to time (repeat for several) [default: int4]")
@click.option("--prompt-len", default=128, show_default=True, type=click.IntRange(min=1), help="language models: prompt tokens")
@click.option("--gen-len", default=64, show_default=True, type=click.IntRange(min=2), help="language models: new tokens")
@click.option("--ov-ir", type=click.Path(file_okay=False), help="language models: an OpenVINO GenAI IR folder (optimum-intel export) to time as a peer")
@friendly
def bench(sources, runs, warmup, threads, as_json, html, quantize, calib, tune, tune_budget, lm_weights, prompt_len, gen_len, ov_ir):
    """Time SOURCES (zoo:NAME, file.py:fn, model.onnx) with edgellm against PyTorch, ONNX Runtime and OpenVINO; a language
    model (.gguf, transformers folder, zoo:smollm2-135m) against llama.cpp, transformers and OpenVINO GenAI."""
    from edgellm.bench import bench as run_bench
    from edgellm.bench import format_table, write_html
    from edgellm.llm.source import is_lm_source

    console = _console()
    if len(sources) == 1 and is_lm_source(sources[0]):
        from edgellm.llm import bench as lm_bench

        report = lm_bench.bench_lm(sources[0], lm_weights or ("int4",), threads, prompt_len, gen_len, runs=min(runs, 3), ov_ir=ov_ir,
                                   progress=None if as_json else lambda m: console.print(f"  {m}"))
        _emit(report, as_json, lambda r: click.echo(lm_bench.format_table(r)))
        if html:
            lm_bench.write_html(report, html)
        return
    report = run_bench(list(sources), threads, runs, warmup, Path("build") / "bench", progress=None if as_json else lambda m: console.print(f"  {m}"),
                       quantize=quantize, calib=calib, tune=tune, tune_budget=tune_budget)
    _emit(report, as_json, lambda r: click.echo(format_table(r)))
    if html:
        write_html(report, html)


@main.command()
@click.option("--model", default="kws-cnn", show_default=True, help="zoo model to build")
@click.option("-o", "--output", default="build/demo.edgepkg", show_default=True, type=click.Path(dir_okay=False))
@friendly
def demo(model, output):
    """Build a zoo model for this machine, load it with the runtime, run it and profile it."""
    from edgellm import api, runtime, zoo
    from edgellm.runtime.profile import format_report

    Path(output).parent.mkdir(parents=True, exist_ok=True)
    console = _console()
    console.print(f"[bold]1. build[/bold] zoo:{model} ({zoo.describe(model)}) for this machine")
    progress = StageProgress()
    try:
        result = api.build(f"zoo:{model}", "host", output, progress=progress)
    finally:
        progress.close()
    console.print(f"[bold]2. load[/bold] {result.path} with edgellm.runtime")
    m = runtime.load(result.path)
    click.echo(f"   {m!r}")
    console.print("[bold]3. run[/bold] the package's example input")
    check = m.check_reference()
    y = m(**m.example_inputs())
    click.echo(f"   output {y.shape}, argmax {int(y.argmax())}, max error vs PyTorch fp32 {check['max_abs']:.2g}")
    console.print("[bold]4. profile[/bold]")
    click.echo(format_report(m.profile(runs=100, warmup=10, per_op=True), top=8))


if __name__ == "__main__":
    main()
