"""The version of loraplex (a module of its own, so the core can read it without importing the package)."""

__version__ = "0.1.0"  # = [project] version in pyproject.toml
