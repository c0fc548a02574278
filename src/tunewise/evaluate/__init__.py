"""Generation runner, baseline arms, metrics, statistics, verdict."""
