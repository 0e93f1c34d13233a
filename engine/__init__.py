"""bgsynth: GPU-accelerated, batched variant synthesis for background-reliance research (ImageNet-9)."""

__version__ = "0.1.0"
