"""What the trainers share: the train state, checkpoints (orbax), metrics (clu), evaluation.

Import the submodules you need (`from simclr_jax.train import checkpoint, evaluate, metrics`);
only the small state module is loaded here, so importing the package stays cheap.
"""

from simclr_jax.train.state import TrainState

__all__ = ["TrainState"]
