"""resolver: real-time customer identity resolution for contact centers."""

__version__ = "0.1.0"
