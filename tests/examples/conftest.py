import os
import sys

# The example's modules live in examples/minilm (a folder of scripts, not an installed package).
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples", "minilm"))
