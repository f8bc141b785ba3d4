"""Models: loading a causal LM and its tokenizer, the built-in tiny models of each seed
architecture, and the map of linear-like weights to their input features.
"""
