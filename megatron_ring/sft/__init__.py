"""Distillation SFT (Ring-Lite-Distill) on megatron-core. This package grows with the SFT issue; its
first piece is the packed-row batch with per-sequence attention (``data.py``)."""
