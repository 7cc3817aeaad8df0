"""dvd-serve: Decoupled Vision-Language Deployment for InternVL3.5."""

__version__ = "0.1.0"
