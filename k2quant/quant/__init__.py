"""Quantization schemes and kernels. Imports only torch and the standard library."""
