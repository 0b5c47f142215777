"""Backends turn (recipe, plan) into running ranks. They know nothing of models."""
