"""Operators: each a typed function with a pure-PyTorch reference and optional device fast paths.

See ``bevnext.ops._dispatch`` for how a fast path is chosen; ``BEVNEXT_OPS=reference`` forces the
reference implementation everywhere.
"""
