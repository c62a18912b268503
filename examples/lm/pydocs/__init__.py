"""pydocs: the language-model example's data factory (a stream of tokenized docstrings)."""
