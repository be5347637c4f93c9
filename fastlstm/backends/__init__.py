"""One module per backend; ``base`` holds the primitives they share (see its docstring)."""
