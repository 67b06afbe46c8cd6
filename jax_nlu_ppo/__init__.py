"""jax_nlu_ppo: PPO with LoRA on LLaMA-family models in JAX/Flax for natural-language understanding."""
from jax_nlu_ppo.llama_config import LlamaConfig, RopeScaling, UnsupportedModelError
from jax_nlu_ppo.pretrained import DEFAULT_MODEL, LanguageModel, load_pretrained
from jax_nlu_ppo.sampling import SamplingConfig
from jax_nlu_ppo.weights import CheckpointError

__all__ = [
    "CheckpointError", "DEFAULT_MODEL", "LanguageModel", "LlamaConfig", "RopeScaling",
    "SamplingConfig", "UnsupportedModelError", "load_pretrained",
]
__version__ = "0.1.0"
