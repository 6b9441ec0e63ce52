from .build import build_model, transformer_config, use_transformer_engine
from .hf_config import ConfigNotSupported, MappedConfig, load_hf_config, map_hf_config

__all__ = ["ConfigNotSupported", "MappedConfig", "build_model", "load_hf_config", "map_hf_config",
           "transformer_config", "use_transformer_engine"]
