"""Decoding: jitted greedy / beam search over the T5 decoder, constrained decoding."""
