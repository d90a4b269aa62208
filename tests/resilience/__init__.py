"""Tests of meshnode: resilience (a package, so their helpers are importable modules)."""
