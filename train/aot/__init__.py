"""Ahead-of-time compilation for real TPU topologies on any machine with libtpu (`python -m train.aot`)."""
