"""The demo: a real fine-tuning run on the 8x8 digits that ship with scikit-learn."""
