"""Tests of meshnode: dht (a package, so their helpers are importable modules)."""
