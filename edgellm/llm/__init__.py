"""Causal language models (Llama, Mistral, Qwen2, Qwen3): from a GGUF file or a transformers folder to a package
with prefill and decode over TVM's paged KV cache. The runtime side is edgellm/runtime/lm.py.

    source.py   GGUF / transformers folder / zoo -> LMSource (config, weights as they came, tokenizer)
    weights.py  --weights fp32 | int8 | int4 -> a scheme per layer and the packed arrays
    model.py    the decoder in relax.frontend.nn; layers.py / qlinear.py its weight-compressed linear kernels
    compile.py  TVM Relax -> model.so;  reference.py  the numpy decoder builds are checked against
    build.py    the stages of `edgellm build` for a language model;  bench.py  the side-by-side with the peers
"""
