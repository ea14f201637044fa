"""Operators: a pure-PyTorch reference each, with optional NPU / CUDA fast paths — filled by the model issue."""
