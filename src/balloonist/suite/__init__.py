"""The policy suite: many generated overcommitted hosts, every policy on each (docs/suite.md)."""
