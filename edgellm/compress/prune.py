"""Pruning a PyTorch model before it is traced.

Structured (``mode="structured"``): torch-pruning's DependencyGraph finds the channels that must go together
(a conv's output channels with the next BatchNorm, depthwise conv and the following conv's inputs; a linear's
hidden units with the next linear's inputs; the q/k/v heads of one attention with the output projection's
inputs) and MagnitudePruner removes the least important ``ratio`` of each group, so every affected tensor
really shrinks: fewer params, fewer MACs, a smaller package and a faster model on any backend. Importance:
``l1`` / ``l2`` (GroupMagnitudeImportance, p=1/2, the group norm of the coupled weights) or ``taylor``
(GroupTaylorImportance: |w * dL/dw| after one forward/backward on the example inputs, with the model's own
argmax as labels for classifiers and the sum of outputs otherwise).

Never pruned: the layer that produces the model's output (the classifier's classes), embedding tables and
everything tied to the embedding width (for a transformer encoder the residual stream keeps its width; only
attention heads and FFN intermediate units go). For edgellm's MiniLM (and any HF-BERT-style self-attention
with query/key/value linears) whole heads are removed: 12 heads at ratio 0.3 keep 8, and the attention's
head count is updated so the reshape follows (its forward is swapped for one that reads the head count from
the module instead of a constant).

Unstructured (``mode="unstructured"``): magnitude sparsity with torch.nn.utils.prune (global over all
conv/linear weights, or per layer), made permanent; tensors keep their shapes and hold zeros.
Honest note on speed: on this x86-64 CPU no edgellm backend turns unstructured sparsity into speed. TVM
compiles dense kernels. OpenVINO's CPU plugin has a sparse-weights decompression option
(CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE) that applies only to int8 FullyConnected layers on CPUs with AMX
(Sapphire Rapids and later); this AMD EPYC has AVX-512 VNNI but no AMX, so the option does nothing here.
Measured (``sparse_weights_speedup``-style, alternating blocks, 2 threads): MiniLM int8 with 80% unstructured
sparsity runs the same kernels (brgemm_avx512_i8) with and without the option, 5.44 vs 5.39 ms. What
unstructured pruning buys is a smaller package once its weights are deflated (``deflated_size``; packages
deflate every member): MobileNetV2 at 50% sparsity, model.bin 13.9 MB ->
7.6 MB deflated (int8-weights: 3.6 -> 2.3 MB); MiniLM 89.7 -> 66.9 MB (its embedding tables are not sparsified).
"""

from __future__ import annotations

import copy
import functools
import io
import math
import zlib
from collections.abc import Callable

import numpy as np

from edgellm.errors import EdgeError

MODES = ("structured", "unstructured")
TORCH_PRUNING_VERSION = "1.6.1"
IMPORTANCES = ("l1", "l2", "taylor")


def _tensors(module, example_inputs: dict[str, np.ndarray]) -> tuple:
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in example_inputs.values())


def state_dict_bytes(module) -> int:
    """Size of ``torch.save(module.state_dict())``: what the weights cost serialized."""
    import torch

    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def deflated_size(module) -> int:
    """Size of the serialized state_dict after DEFLATE (what a ZIP_DEFLATED package member would take)."""
    import torch

    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return len(zlib.compress(buffer.getvalue(), 6))


def import_torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        raise EdgeError("pruning needs torch-pruning, which is not installed", f"pip install torch-pruning=={TORCH_PRUNING_VERSION}") from None
    return torch_pruning


def _count(module, args) -> tuple[int, int]:
    tp = import_torch_pruning()

    macs, params = tp.utils.count_ops_and_params(module, args)
    return int(macs), int(params)


def _outputs(module, args) -> list:
    import torch

    from edgellm.trace import _flatten

    with torch.no_grad():
        return _flatten(module(*args))


def _last_layer(module, args):
    """The conv/linear that ran last: it makes the output (a classifier's classes), so it keeps its output channels."""
    import torch
    from torch import nn

    order = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod)) for m in module.modules()
             if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d))]
    try:
        with torch.no_grad():
            module(*args)
    finally:
        for h in hooks:
            h.remove()
    return order[-1] if order else None


def _attention_modules(module):
    """Self-attentions with query/key/value linears whose heads torch-pruning can remove: [(module, num_heads)]."""
    from torch import nn

    from edgellm.zoo import minilm

    found = []
    for m in module.modules():
        if not all(isinstance(getattr(m, n, None), nn.Linear) for n in ("query", "key", "value")):
            continue
        if isinstance(m, minilm.SelfAttention):
            heads = getattr(m, "num_heads", minilm.HEADS)
        else:
            heads = getattr(m, "num_heads", None) or getattr(m, "num_attention_heads", None)
        if heads:
            found.append((m, int(heads)))
    return found


@functools.cache
def _prunable_minilm_attention():
    """MiniLM's SelfAttention with the head count read from the module (its own forward uses module constants)."""
    import torch

    from edgellm.zoo import minilm

    class PrunableSelfAttention(minilm.SelfAttention):
        num_heads: int
        scale: float

        def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
            b, s, _ = x.shape

            def heads(t):
                return t.reshape(b, s, self.num_heads, -1).transpose(1, 2)

            q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale + mask_bias
            ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
            return ctx.transpose(1, 2).reshape(b, s, -1)

    return PrunableSelfAttention


def _make_heads_prunable(module) -> list:
    from edgellm.zoo import minilm

    attention = _attention_modules(module)
    cls = None
    for m, heads in attention:
        if type(m) is minilm.SelfAttention:
            cls = cls or _prunable_minilm_attention()
            m.__class__ = cls
            m.num_heads = heads
            m.scale = 1.0 / math.sqrt(minilm.HIDDEN // minilm.HEADS)  # the original head width: scores keep their scale
    return attention


def _importance(importance: str):
    tp = import_torch_pruning()

    if importance == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if importance == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if importance == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise EdgeError(f"unknown pruning importance {importance!r}", f"use one of {', '.join(IMPORTANCES)}")


def _taylor_backward(module, args) -> None:
    """One forward/backward for Taylor importance, without labels: the model's own argmax for classifiers."""
    import torch

    module.zero_grad()
    with torch.enable_grad():
        out = module(*args)
        outs = [out] if isinstance(out, torch.Tensor) else list(out)
        loss = 0.0
        for o in outs:
            if o.ndim == 2 and o.shape[-1] > 1:
                # a confident classifier has ~0 cross-entropy gradient: the logits' own magnitude keeps a signal
                loss = loss + torch.nn.functional.cross_entropy(o, o.detach().argmax(-1)) + 1e-3 * (o**2).sum()
            else:
                loss = loss + o.float().sum()
        loss.backward()


def prune(module, example_inputs: dict[str, np.ndarray], ratio: float, mode: str = "structured", importance: str = "l2",
          finetune: Callable | None = None, *, round_to: int | None = None, scope: str = "global"):
    """(pruned copy of ``module``, report). ``ratio``: the share of channels/units/heads (structured) or of
    weights (unstructured) removed. ``finetune(module) -> module``, if given, runs on the pruned model
    (e.g. a few epochs of distillation) before the report. ``round_to``: keep channel counts multiples of it
    (structured; the nearest multiple; ``edgellm build`` uses the target's fp32 SIMD lanes, 16 on AVX-512:
    kws-cnn's 64-channel layers pruned to 45 ran 2.5x slower than unpruned in TVM, to 48 they run faster).
    ``scope``: unstructured only, "global" or "layer"."""
    import torch

    if mode not in MODES:
        raise EdgeError(f"unknown pruning mode {mode!r}", f"use one of {', '.join(MODES)}")
    if not 0.0 < float(ratio) < 1.0:
        raise EdgeError(f"pruning ratio {ratio} is not between 0 and 1", "e.g. --prune 0.3 removes 30%")
    if importance not in IMPORTANCES:
        raise EdgeError(f"unknown pruning importance {importance!r}", f"use one of {', '.join(IMPORTANCES)}")
    if not isinstance(module, torch.nn.Module):
        raise EdgeError(f"pruning needs a PyTorch module, got a {type(module).__name__}",
                        "prune a zoo model or a file.py:factory model (not ONNX, not a .pt2 program)")
    module = copy.deepcopy(module).eval()
    args = _tensors(module, example_inputs)
    reference = _outputs(module, args)
    before = {"params": None, "macs": None, "state_dict_bytes": state_dict_bytes(module)}
    before["macs"], before["params"] = _count(module, args)
    if mode == "structured":
        module, detail = _structured(module, args, float(ratio), importance, round_to)
    else:
        if importance == "taylor":
            raise EdgeError("unstructured pruning ranks weights by magnitude only", "use --prune-importance l1 or l2, or structured mode")
        module, detail = _unstructured(module, float(ratio), importance, scope)
    if finetune is not None:
        try:
            module = finetune(module)
        except EdgeError:
            raise
        except Exception as e:  # the user's training code failed: say so, not our stack
            raise EdgeError(f"the finetune callback raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
        if not isinstance(module, torch.nn.Module):
            raise EdgeError("the finetune callback must return the module")
        module.eval()
    try:
        got = _outputs(module, args)
    except Exception as e:
        raise EdgeError(f"the pruned model fails to run ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})",
                        "use --prune-mode unstructured for this model") from None
    if [tuple(a.shape) for a in got] != [tuple(a.shape) for a in reference]:
        raise EdgeError(f"pruning changed the model's output shapes ({[list(a.shape) for a in reference]} -> "
                        f"{[list(a.shape) for a in got]})", "use --prune-mode unstructured for this model")
    after = {"state_dict_bytes": state_dict_bytes(module)}
    after["macs"], after["params"] = _count(module, args)
    if mode == "unstructured":
        after["nonzero_params"] = detail.pop("nonzero_params")
        before["deflated_bytes"], after["deflated_bytes"] = detail.pop("deflated_before"), deflated_size(module)
    from edgellm.runtime.accuracy import compare

    agreement = {f"output_{i}": compare(r, g) for i, (r, g) in enumerate(zip(reference, got))}
    report = {"mode": mode, "ratio": float(ratio), "importance": importance, "before": before, "after": after,
              "params_ratio": after["params"] / before["params"], "macs_ratio": after["macs"] / before["macs"],
              "size_ratio": after["state_dict_bytes"] / before["state_dict_bytes"],
              "finetuned": finetune is not None,
              "example_cosine": {k: v["cosine"] for k, v in agreement.items()},  # pruned vs unpruned on the example input
              **detail}
    return module, report


def _nearest_round_pruner(tp):
    """torch-pruning's MagnitudePruner, rounding the channels a layer keeps to the *nearest* multiple of
    round_to (never below one multiple). torch-pruning floors: ratio 0.3 of 64 channels kept 32 at round_to 16."""

    class NearestRoundPruner(tp.pruner.MagnitudePruner):
        def _round_to(self, n_pruned, current_channels, round_to):
            kept = max(round_to, round((current_channels - n_pruned) / round_to) * round_to)
            return max(current_channels - kept, 0)

    return NearestRoundPruner


def _structured(module, args, ratio: float, importance: str, round_to: int | None):
    tp = import_torch_pruning()
    from torch import nn

    shapes_before = {n: tuple(p.shape) for n, p in module.named_parameters()}
    attention = _make_heads_prunable(module)
    ignored = [m for m in module.modules() if isinstance(m, nn.Embedding)]
    last = _last_layer(module, args)
    if last is not None:
        ignored.append(last)
    if attention:
        # the residual stream (embedding width) stays: every linear writing into it is ignored, so only heads
        # (q/k/v outputs with the output projection's inputs) and FFN intermediate units are pruned.
        width = {m.query.in_features for m, _ in attention}
        qkv = {id(lin) for m, _ in attention for lin in (m.query, m.key, m.value)}
        ignored += [m for m in module.modules() if isinstance(m, nn.Linear) and m.out_features in width and id(m) not in qkv]
    num_heads = {}
    for m, heads in attention:
        num_heads[m.query] = num_heads[m.key] = num_heads[m.value] = heads
    if importance == "taylor":
        _taylor_backward(module, args)
    try:
        pruner = _nearest_round_pruner(tp)(
            module, args, importance=_importance(importance), pruning_ratio=ratio, ignored_layers=ignored,
            round_to=round_to, num_heads=num_heads, prune_num_heads=bool(attention), prune_head_dims=False,
            head_pruning_ratio=ratio if attention else 0.0, output_transform=None)
        pruner.step()
    except EdgeError:
        raise
    except Exception as e:
        raise EdgeError(f"torch-pruning could not prune this model ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})",
                        "use --prune-mode unstructured") from None
    heads = []
    for m, h in attention:
        new = pruner.num_heads.get(m.query, h)
        if m.query.out_features % max(new, 1):
            raise EdgeError("torch-pruning left attention heads of unequal width", "use --prune-mode unstructured")
        m.num_heads = new
        if hasattr(m, "num_attention_heads"):  # HF naming
            m.num_attention_heads = new
            m.attention_head_size = m.query.out_features // new
            m.all_head_size = m.query.out_features
        heads.append((h, new))
    module.zero_grad(set_to_none=True)
    for p in module.parameters():
        p.requires_grad_(False)
    shrunk = {n: {"before": list(shapes_before[n]), "after": list(p.shape)} for n, p in module.named_parameters()
              if n in shapes_before and tuple(p.shape) != shapes_before[n]}
    if not shrunk:
        raise EdgeError(f"structured pruning at ratio {ratio} removed nothing from this model", "use a larger ratio or --prune-mode unstructured")
    detail = {"shrunk_tensors": len(shrunk), "round_to": round_to, "tensors": shrunk}
    if heads:
        detail["attention_heads"] = {"before": sum(h for h, _ in heads), "after": sum(n for _, n in heads), "per_layer": [n for _, n in heads]}
    return module, detail


def _unstructured(module, ratio: float, importance: str, scope: str):
    from torch import nn
    from torch.nn.utils import prune as tprune

    if scope not in ("global", "layer"):
        raise EdgeError(f"unknown unstructured pruning scope {scope!r}", "use global or layer")
    deflated_before = deflated_size(module)
    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if not layers:
        raise EdgeError("the model has no conv or linear layers to sparsify")
    if scope == "global":
        # magnitude ranking: |w| is the same order for L1 and L2 on single weights
        tprune.global_unstructured([(m, "weight") for _, m in layers], pruning_method=tprune.L1Unstructured, amount=ratio)
    else:
        for _, m in layers:
            tprune.l1_unstructured(m, "weight", amount=ratio)
    for _, m in layers:
        tprune.remove(m, "weight")  # make it permanent: weight = weight_orig * mask
    per_layer = {}
    zeros = total = 0
    for name, m in layers:
        w = m.weight.detach()
        z = int((w == 0).sum())
        per_layer[name] = {"shape": list(w.shape), "sparsity": z / w.numel()}
        zeros, total = zeros + z, total + w.numel()
    nonzero = sum(int((p != 0).sum()) for p in module.parameters())
    return module, {"scope": scope, "sparsity": zeros / total, "layers": per_layer, "nonzero_params": nonzero,
                    "deflated_before": deflated_before,
                    "speed_note": "tensors keep their shapes: no backend here runs sparse kernels on this CPU, "
                                  "the gain is package size once weights are deflated"}


def export(module, example_inputs: dict[str, np.ndarray], path) -> None:
    """Save a pruned module as a torch.export program (.pt2) that ``edgellm build`` takes as a source."""
    import torch

    args = _tensors(module, example_inputs)
    try:
        program = torch.export.export(module, args)
    except Exception as e:
        raise EdgeError(f"torch.export could not capture the pruned model ({type(e).__name__}: {str(e).strip().splitlines()[0][:300]})") from None
    torch.export.save(program, str(path))


def _check_prunable(src) -> None:
    if src.kind == "onnx":
        raise EdgeError("pruning works on PyTorch models; this source is ONNX", "prune the PyTorch model (zoo:NAME or file.py:fn)")
    if src.kind == "pt2":
        raise EdgeError("a .pt2 program has lost the module structure pruning needs (its layers are graph ops)",
                        "prune the PyTorch model itself: zoo:NAME or file.py:fn (edgellm prune writes a pruned .pt2 from those)")


def prune_source(src, ratio: float, mode: str = "structured", importance: str = "l2", **kwargs) -> dict:
    """Prune an ``edgellm.source.Source`` in place (its model becomes the pruned module) and return the report.
    Takes zoo and factory sources (an nn.Module); not ONNX models nor .pt2 programs."""
    _check_prunable(src)
    src.model, report = prune(src.model, src.inputs, ratio, mode, importance, **kwargs)
    return report


def sparse_weights_speedup(compiled_ir_xml: str, weights: bytes, feeds: dict, threads: int = 2, runs: int = 50) -> dict:
    """p50 ms of an (int8) OpenVINO IR with and without CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE=0.5, same process."""
    import openvino as ov

    from edgellm.runtime.profile import time_runs

    core = ov.Core()
    out = {}
    for tag, extra in (("dense", {}), ("sparse", {"CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE": 0.5})):
        try:
            compiled = core.compile_model(compiled_ir_xml, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                                                   "PERFORMANCE_HINT": "LATENCY", **extra}, weights=weights)
        except Exception as e:
            out[tag] = f"not supported: {str(e).strip().splitlines()[-1][:200]}"
            continue
        request = compiled.create_infer_request()
        out[tag] = float(sorted(time_runs(lambda: request.infer(feeds), runs, warmup=5))[runs // 2] * 1e3)
    return out


def _n(x: float) -> str:
    return f"{x / 1e9:.3g}G" if x >= 1e9 else f"{x / 1e6:.3g}M" if x >= 1e6 else f"{x / 1e3:.3g}k"


def summary(report: dict) -> str:
    """One line for a prune report."""
    b, a = report["before"], report["after"]
    if report["mode"] == "unstructured":
        return (f"unstructured {report['ratio']:g}: {report['sparsity']:.0%} of weights zero, "
                f"deflated {_n(b['deflated_bytes'])}B -> {_n(a['deflated_bytes'])}B")
    heads = report.get("attention_heads")
    return (f"structured {report['ratio']:g}: params {_n(b['params'])} -> {_n(a['params'])}, MACs {_n(b['macs'])} -> {_n(a['macs'])}"
            + (f", heads {heads['before']} -> {heads['after']}" if heads else ""))


def prune_to_file(ref: str, ratio: float, mode: str, importance: str, output, finetune: Callable | None = None,
                  round_to: int | None = None) -> dict:
    """``edgellm prune``: load a source, prune it, save a .pt2 program; the report (tensor shapes left out) + summary."""
    from pathlib import Path

    from edgellm import source as sources

    output = Path(output)
    if output.suffix != ".pt2":
        raise EdgeError(f"output {output} should end in .pt2", "the pruned model is saved as a torch.export program")
    if not output.parent.is_dir():
        raise EdgeError(f"cannot write {output}: folder {output.parent} does not exist", f"mkdir -p {output.parent}")
    src = sources.load(ref)
    _check_prunable(src)
    pruned, report = prune(src.model, src.inputs, ratio, mode, importance, finetune, round_to=round_to)
    tmp = output.with_name(f".{output.stem}.tmp.pt2")
    try:
        export(pruned, src.inputs, tmp)
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    report = {k: v for k, v in report.items() if k != "tensors"}
    report["output"] = str(output)
    report["summary"] = f"wrote {output}: " + summary(report)
    return report
