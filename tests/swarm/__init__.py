"""Tests of meshnode: swarm (a package, so their helpers are importable modules)."""
