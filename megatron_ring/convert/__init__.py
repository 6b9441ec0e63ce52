from .mapping import ConversionError, expected_hf_shapes, hf_to_mcore, mcore_to_hf, verify_hf_state

__all__ = ["ConversionError", "expected_hf_shapes", "hf_to_mcore", "mcore_to_hf", "verify_hf_state"]
