"""shopvec embedders: open_clip model loading, preprocessing, batched inference and fusion (no Beam)."""
