"""Offline stages: ingest, crop, augment, instructions, embed, shards, and the runner they share."""
