"""Ways out of the build for a merge: a GGUF file for llama.cpp with an Ollama Modelfile and LM
Studio's layout (kind gguf), or a PEFT LoRA adapter over a base (kind lora, mergekit_ops' extraction)."""

KINDS = ("gguf", "lora")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # the GGUF tensor types gguf_llama.py writes
LORA_EMBEDDINGS = (None, "lora", "full")  # mergekit_ops.ExtractOptions.embeddings
