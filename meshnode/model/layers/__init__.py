"""Generic decoder layers as Flax NNX modules; the families compose them (MaxText's split).

Modules:

- ``norms``      RMSNorm (Llama's form); rms_norm as a function
- ``linear``     project(x, weight): one matmul over a float or a quantized weight
- ``attention``  Attention (fused q/k/v, grouped heads, optional biases, qk-norm, window,
                 softcap) over a CacheView of the span's KV cache; attention_mask,
                 decode_attention (the native kernel)
- ``mlp``        GatedMLP (SwiGLU, GeGLU)
- ``moe``        MoE: top-k routed gated-MLP experts (Mixtral)
- ``block``      DecoderBlock (pre-norm, optional post-norms), DecoderStack (a span of blocks)

Every module is constructed from its weights (numpy or JAX arrays, or
``QuantizedMatrix``) held in ``nnx.Param``; the span runner splits a stack
once (``nnx.split``) and runs a jitted pure function that merges it back.
"""
