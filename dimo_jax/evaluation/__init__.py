"""Sample-quality evaluation: settings, sample sets, feature extractors, metrics, tables."""
