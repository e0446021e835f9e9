"""rpg_megatron: RPG KL-regularized policy gradients on Megatron-Core."""

__version__ = "0.1.0"
