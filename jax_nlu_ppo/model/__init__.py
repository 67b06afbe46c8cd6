"""The LLaMA decoder, its adapters, prompts and generation, and loading pretrained weights."""
