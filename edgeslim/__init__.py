"""edgeslim: compress ML models for edge fleets, as a Kubernetes operator and a CLI."""

__version__ = "0.1.0"
