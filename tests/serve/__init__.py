"""Tests of meshnode: serve (a package, so their helpers are importable modules)."""
