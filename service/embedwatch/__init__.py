"""embedwatch: drift, data-quality and latency monitoring for production embedding streams."""

__version__ = "0.1.0"
