"""Redis streams between the services; README.md documents every key, schema and retention rule."""
