"""The released google-research/simclr checkpoints, read into this project's models.

`python -m simclr_jax.convert` is the entry point. The pieces, each one idea:

* walk.py: our parameter paths in the order the official code creates its layers;
* parse.py: a TF1 (name-based) or TF2 SavedModel variable list, sorted into layers, with the
  variables that are not part of the model (optimizer slots, step, EMA copy) set aside;
* plan.py: the architecture those layers describe and where every variable goes, checked against
  the shapes of our model (shapes only: nothing is read or allocated);
* reader.py: finding and reading the checkpoint with TensorFlow (imported only there).
"""

from simclr_jax.official.parse import Parsed, parse
from simclr_jax.official.plan import ConversionError, Plan, make_plan

__all__ = ["ConversionError", "Parsed", "Plan", "make_plan", "parse"]
