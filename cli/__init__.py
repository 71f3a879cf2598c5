"""The convllava-edge command line (a thin layer over the library)."""
