"""Per-family composition of the generic layers (meshnode/model/layers/).

Modules:

- ``llama``   Llama, Mistral, Qwen2, Qwen3: pre-norm blocks, SwiGLU, RMSNorm
- ``gemma3``  Gemma 3: (1 + w) norms, sandwich norms, qk-norm, GeGLU, local/global layers
- ``mixtral`` Mixtral: Mistral's attention, a sparse mixture of SwiGLU experts
- ``registry`` family(config) -> the module; build_stack; HeadSpec

``family(config)`` gives the module of a config's family; each has
``build_block(config, index, params) -> DecoderBlock`` (params: one layer's
dict, see meshnode/model/weights.py) and ``HEAD``, the client-side quirks
(``HeadSpec``: final norm offset, embedding scale).
"""
