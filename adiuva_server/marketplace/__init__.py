"""The plugin marketplace: bundled catalog, automated and human review, signed packages, installs and ratings."""
