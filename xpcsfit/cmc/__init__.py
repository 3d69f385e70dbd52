"""Consensus Monte Carlo: shards, likelihood, NUTS per shard, combination, results."""
