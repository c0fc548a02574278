"""Recipes in and out of the tools users already run (Axolotl)."""
