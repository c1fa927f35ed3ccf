"""The demo: its spoken multi-task corpus, its own pretrained backbones and the end-to-end run."""
