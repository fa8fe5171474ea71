import os
import sys

# keras picks its backend once, at import: these tests drive keras-hub models through JAX.
os.environ.setdefault("KERAS_BACKEND", "jax")
# The shared tiny models live next to the tests; importlib mode does not put this folder on sys.path.
sys.path.insert(0, os.path.dirname(__file__))
