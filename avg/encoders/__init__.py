"""Image/text encoders that put both modalities into one embedding space."""
