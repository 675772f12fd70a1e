"""First-party dyncompute plugins, installed as ``dyncompute_plugins`` and registered through the
``dyncompute.plugins`` entry-point group exactly as a third-party package would be."""
