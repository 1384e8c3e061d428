"""Real text from installed packages: corpus fetching and extraction, tokenization, TFDS + grain."""
