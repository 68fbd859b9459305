"""CEL support: the compiler to Python (compile.py), cel-python as the reference (reference.py)."""
