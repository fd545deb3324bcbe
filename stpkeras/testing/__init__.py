"""Test doubles: a tiny classifier with the model contract and a stand-in for TF Serving.

Nothing here is used by the library itself; tests and benchmarks import it.
"""
