"""Files shipped inside the package: the demo backbone and its card (demo_backbone.md)."""
import os

DEMO_BACKBONE = os.path.join(os.path.dirname(__file__), 'demo_backbone.safetensors')
