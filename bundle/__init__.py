"""centernet-bundle: a folder an embedded team builds with make/CMake (C library, model files, manifest)."""
