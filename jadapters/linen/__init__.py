"""The Linen front-end: adapters on unmodified Linen models through method interception."""
