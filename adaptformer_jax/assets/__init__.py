"""Files shipped inside the package: the demo backbones and their cards (NAME.md beside each)."""
import os

DEMO_BACKBONE = os.path.join(os.path.dirname(__file__), 'demo_backbone.safetensors')
VIDEO_BACKBONE = os.path.join(os.path.dirname(__file__), 'video_backbone.safetensors')
