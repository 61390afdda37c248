"""Triton kernels of semu_fast, installed as semu_fast.triton_kernels (never a top-level package: see DESIGN §3).

Each module holds one op's kernel(s) and its launcher; importing requires Triton."""
