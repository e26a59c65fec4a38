"""Rollout: the statistics behind promoting a challenger over the champion; pure numpy, imports nothing of mlops."""
