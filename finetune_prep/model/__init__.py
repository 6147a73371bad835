"""Build a model (torchvision, timm, Hugging Face or a `_target_` class), its heads and stages."""
