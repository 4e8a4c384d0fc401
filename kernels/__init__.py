"""Triton kernels and their launchers. Imported only through fastcnc._backend (``_backend.kernels(name)``)."""
