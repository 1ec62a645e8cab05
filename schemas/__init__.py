"""JSON Schemas of every file wsi-psm writes (shipped as package data, used by the tests)."""
