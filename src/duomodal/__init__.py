"""duomodal: train your own small DALL-E and CLIP, generate images from text, search images by what they show."""

__version__ = "0.1.0"
