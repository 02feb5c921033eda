"""Non-deep-learning baseline of paper 000 §2.4: hand-crafted lesion features + LDA."""
