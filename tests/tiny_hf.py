"""Tiny random Hugging Face LLaMA checkpoints, written with transformers' own `save_pretrained`."""
import numpy as np
import torch
import transformers

BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def save_tiny(folder, model_type="llama", seed=0, dtype=torch.float32, max_shard_size=None,
              **overrides):
  """Saves a random model to `folder`; returns the torch model (float32, eval mode)."""
  config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
  model_cls = {"llama": transformers.LlamaForCausalLM,
               "qwen2": transformers.Qwen2ForCausalLM}[model_type]
  config = config_cls(**(BASE | overrides))
  torch.manual_seed(seed)
  model = model_cls(config).eval()
  # Random init leaves norms at 1 and biases at 0; perturb them so a wrong mapping shows.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.to(dtype).save_pretrained(folder, **kwargs)
  return model.float()


def left_padded_batch(vocab_size, batch=3, length=12, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab_size, (batch, length))
  mask = np.ones_like(ids)
  for row in range(1, batch):
    pad = int(rng.integers(1, length // 2))
    mask[row, :pad] = 0
    ids[row, :pad] = 0
  return ids, mask


def torch_logits(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
