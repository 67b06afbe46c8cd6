"""jax_nlu_ppo: PPO with LoRA on LLaMA-family models in JAX/Flax for natural-language understanding."""
from jax_nlu_ppo.model.llama_config import LlamaConfig, RopeScaling, UnsupportedModelError
from jax_nlu_ppo.model.pretrained import DEFAULT_MODEL, LanguageModel, load_pretrained
from jax_nlu_ppo.model.sampling import SamplingConfig
from jax_nlu_ppo.model.weights import CheckpointError

__all__ = [
    "CheckpointError", "DEFAULT_MODEL", "LanguageModel", "LlamaConfig", "RopeScaling",
    "SamplingConfig", "UnsupportedModelError", "load_pretrained",
]
__version__ = "0.1.0"
