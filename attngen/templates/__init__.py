"""Jinja2 templates of the generated C kernels (package data)."""
