"""The Dream phase: synthetic strategies, the red-team library, the quality gate and the rater queue."""
