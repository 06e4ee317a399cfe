"""posttrain: post-train language models from human and AI feedback.

Importing the package is cheap: heavy libraries (torch, transformers) load only where used.
"""

__version__ = "0.1.0"
