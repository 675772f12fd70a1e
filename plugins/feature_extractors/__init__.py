"""First-party feature extractors for sample-quality metrics: `inception` (FID / IS) and `shapes_classifier`
(fid_shapes / is_shapes / cas on the built-in data). Each module registers itself when imported."""
