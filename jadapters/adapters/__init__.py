"""Adapter functional forms: Flax modules and their configs."""
