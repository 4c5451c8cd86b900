"""The NNX front-end: adapter weights as their own variable type, NeMo's mixins."""
