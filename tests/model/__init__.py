"""Tests of meshnode: model (a package, so their helpers are importable modules)."""
