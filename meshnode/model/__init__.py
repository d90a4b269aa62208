"""The model engine: decoder blocks as Flax NNX modules, weights, tokenizers, generation.

Modules:

- ``config``      ModelConfig from config.json or GGUF metadata, named presets
- ``dtypes``      storage dtypes, compute dtype per device
- ``rope``        rotary frequencies (default, linear, llama3) and their application
- ``layers``      generic NNX layers: RMSNorm, Attention, GatedMLP, DecoderBlock, DecoderStack
- ``families``    per-family composition of the layers (llama/mistral/qwen2/qwen3, gemma3)
- ``buckets``     the static shapes: length buckets, prefill chunks (no JAX)
- ``span``        SpanRunner / SpanParams / KVCache: split once, run as a pure jitted function
- ``paged``       PagedArena, PageAllocator, PagedCache: one KV cache shared by many sessions
- ``head``        ClientHead / ClientParams: embedding, final norm, LM head
- ``sampling``    SamplingOptions, Sampler: greedy, temperature, top-k, top-p
- ``checkpoint``  lazy safetensors reading of Hugging Face folders
- ``gguf_reader`` GGUFHeader: a fast GGUF header reader, tensors as memory-mapped views
- ``gguf_file``   GGUF metadata, dequantized tensors, llama.cpp q/k un-permutation
- ``weights``     named tensors -> fused, stacked parameter trees, with shape checks
- ``tokenizer``   Tokenizer: tokenizer.json or GGUF BPE, chat templates
- ``source``      open_model(spec) -> ModelSource, fingerprints
- ``decoding``    ``Generation``, the step-driven generation (no I/O, no JAX), and its
                  synchronous driver ``generate_tokens``
- ``generate``    LocalModel / generate_local / LocalBlocks: all blocks in this process
"""
