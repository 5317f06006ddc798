"""model-agent: put model weights on a cache volume once, correctly, and say when they are there."""

__version__ = "0.2.0"
