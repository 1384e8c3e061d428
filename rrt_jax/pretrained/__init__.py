"""Pretrained checkpoints and their tokenizers: the HF safetensors reader (`hf`), the GGUF reader (`gguf`, the
packaged SmolLM2-135M), the safetensors file format (`safetensors_io`), and the tokenizers (`tokenizer`,
`byte_tokenizer`)."""
