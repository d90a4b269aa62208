"""Tests of meshnode: wire (a package, so their helpers are importable modules)."""
