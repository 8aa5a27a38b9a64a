"""Chainer functions and kernels of smchainer's fast training path."""
