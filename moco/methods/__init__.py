"""Self-supervised methods behind one interface (methods/base.py), one module each."""
