"""Tests of meshnode: mesh (a package, so their helpers are importable modules)."""
