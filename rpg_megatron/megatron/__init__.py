"""Megatron-Core adapters: process groups, model building, training step, loss hook, export."""
