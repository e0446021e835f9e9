"""Rollout engines: the RolloutEngine protocol (engine.py) and its embedded and SGLang versions."""

from rpg_megatron.rollout.engine import RolloutEngine, make_engine

__all__ = ["RolloutEngine", "make_engine"]
