"""bevnext: BEVNeXt camera-only 3D object detection for PyTorch on Ascend NPU, NVIDIA GPU and CPU."""

__version__ = "0.1.0"
