"""retdmctl: a resumable pipeline for RETDM multi-label image classification."""

__version__ = "0.1.0"
