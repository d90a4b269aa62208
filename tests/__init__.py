"""Tests of meshnode (a package, so their helpers are importable modules)."""
