"""Features: preprocessing of clean data into tensor shards, and the loader that reads them."""
