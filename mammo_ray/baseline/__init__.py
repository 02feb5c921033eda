"""Non-deep-learning baseline of paper 000 §2.4 (see docs/papers.md): hand-crafted lesion features + LDA."""
