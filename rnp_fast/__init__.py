"""rnp_fast: a fast, faithful implementation of Reconstructive Neuron Pruning (ICML 2023)."""

__version__ = "0.1.0"
