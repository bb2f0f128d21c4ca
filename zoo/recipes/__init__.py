"""Recipes that reproduce the zoo models from a seed (data preparation and training)."""
