"""HF model code for exported checkpoints (copied next to the weights and loaded via ``auto_map``)."""
from pathlib import Path

HF_CODE_DIR = Path(__file__).parent
HF_CODE_FILES = ("configuration_bailing_moe.py", "modeling_bailing_moe.py")
AUTO_MAP = {
    "AutoConfig": "configuration_bailing_moe.BailingMoeConfig",
    "AutoModel": "modeling_bailing_moe.BailingMoeModel",
    "AutoModelForCausalLM": "modeling_bailing_moe.BailingMoeForCausalLM",
}
# The transformers releases the shipped modeling code is written and tested for (scripts/hf_compat.sh; pyproject has
# the same range); stated in every export's config.json as ``modeling_code_transformers``.
SUPPORTED_TRANSFORMERS = ">=5.0,<6"
