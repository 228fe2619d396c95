"""Reference implementations the tests compare against: PyTorch ports and timm/OpenCLIP adapters."""
