"""Data: image decoding, bad samples, folders and tar shards, normalisation, transforms, labelled sets and the
seeded sampling that makes resume exact."""
