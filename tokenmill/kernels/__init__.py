"""Compiled CPU kernels (C++, built once per machine): attention, RMSNorm and the int8 GEMM helpers."""
