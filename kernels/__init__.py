"""Triton kernels and their launchers, installed as fastattn.kernels.

Kernels here know memory and math only: no autograd, no nn.Module. Importing this package does
not import triton; each kernel module does, so a machine without triton can still use fastattn.
"""
