"""CUDA C sources of smchainer's kernels, as files of the package.

Kept as ``.cu`` files rather than Python strings so that editors, compilers
and linters read them as C; :func:`smchainer.functions.cuda_source` loads
one as text.
"""
